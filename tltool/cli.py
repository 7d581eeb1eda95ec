"""The `tltool` command line: thin Typer commands over the stage functions.

A `TltoolError` becomes one line on stderr and exit code 2; anything else is a bug (exit 1, traceback).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from tltool import __version__
from tltool.errors import TltoolError

app = typer.Typer(
    name="tltool",
    help="Transfer learning for image classification with torchvision backbones.\n\n"
    "Start with `tltool config init > my.yaml`, set data.train, then `tltool finetune my.yaml`.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Show or create configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigPath = Annotated[str, typer.Argument(help="YAML config file.", show_default=False)]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="KEY=VALUE overrides of config keys, e.g. train.epochs=3 model.backbone=resnet50.", show_default=False
    ),
]
CheckpointPath = Annotated[str, typer.Argument(help="A tltool checkpoint (runs/<name>/checkpoints/best.pt).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors into one line on stderr and exit code 2; Ctrl-C into exit 130."""
    try:
        yield
    except TltoolError as exc:
        typer.echo(exc.message(), err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        import torch
        import torchvision

        typer.echo(f"tltool {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Transfer learning for image classification with torchvision backbones."""


@app.command(epilog="Example: tltool finetune configs/mobilenet_v2_frozen.yaml data.train=data/flowers train.epochs=5")
def finetune(
    config: ConfigPath,
    overrides: Overrides = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="auto (the run's checkpoints/last.pt) or a checkpoint path.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the model, data and plan; train and write nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or per-epoch lines.")] = False,
) -> None:
    """Fine-tune a torchvision backbone on a folder of images (new head, frozen features by default)."""
    with user_errors():
        from tltool.config import load_config
        from tltool.train import finetune as run_finetune

        cfg = load_config(config, overrides or [])
        summary = run_finetune(cfg, resume=resume, dry_run=dry_run, quiet=quiet, config_path=config)
        if summary.get("dry_run") or summary.get("finished"):
            return
        best = summary["checkpoints"]["best"] or summary["checkpoints"]["last"]
        best_text = f"{summary['best_metric']:.4f}" if summary["best_metric"] is not None else "n/a"
        typer.echo(
            f"done: {summary['epochs_completed']} epochs in {summary['wall_seconds']:.1f} s; best "
            f"{summary['monitor']} {best_text} at epoch {summary['best_epoch']}; run in {summary['run_dir']}\n"
            f"next: tltool eval {best}   |   tltool export {best} --format onnx"
        )


@app.command("eval", epilog="Example: tltool eval runs/flowers/checkpoints/best.pt --data data/flowers/test")
def eval_command(
    checkpoint: CheckpointPath,
    data: Annotated[
        str | None, typer.Option("--data", help="Folder of class sub-folders; default: the run's val split.")
    ] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the metrics to this JSON file.")] = None,
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Default: the run's.")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", min=0, help="Default: the run's.")] = None,
) -> None:
    """Measure a checkpoint: loss, top-1/top-5, per-class precision/recall/F1, confusion matrix."""
    with user_errors():
        from tltool.config import RunConfig
        from tltool.evaluate import format_report, run_eval

        RunConfig(device=device)  # validates the device name like the config does
        metrics = run_eval(checkpoint, data, json_path, device, batch_size, num_workers)
        typer.echo(f"{checkpoint} on {metrics['data']}")
        typer.echo(format_report(metrics, metrics["class_names"]))
        if json_path:
            typer.echo(f"metrics written to {json_path}")


@app.command(epilog="Example: tltool export runs/flowers/checkpoints/best.pt --format onnx --output flowers.onnx")
def export(
    checkpoint: CheckpointPath,
    format: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript.")] = "onnx",
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output file; default: beside the checkpoint.")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Images for the parity check; default: the run's val split.")
    ] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check outputs against PyTorch.")] = True,
) -> None:
    """Write a deployable model (ONNX or TorchScript) with classes and preprocessing embedded, parity-checked."""
    with user_errors():
        from tltool.export import run_export

        run_export(checkpoint, format, output, data, verify, echo=typer.echo)


@config_app.command("show", epilog="Example: tltool config show configs/resnet50_full.yaml train.lr=1e-4")
def config_show(config: ConfigPath, overrides: Overrides = None) -> None:
    """Print the resolved config (file + overrides + every default) as YAML."""
    with user_errors():
        from tltool.config import load_config

        typer.echo(load_config(config, overrides or []).to_yaml(), nl=False)


@config_app.command("init", epilog="Example: tltool config init > my.yaml")
def config_init() -> None:
    """Print a commented starter config with every key at its default."""
    from tltool.config import starter_yaml

    typer.echo(starter_yaml(), nl=False)


@config_app.command("keys", epilog="Example: tltool config keys")
def config_keys() -> None:
    """Print every config key with its default and meaning (a Markdown table)."""
    from tltool.config import reference_markdown

    typer.echo(reference_markdown(), nl=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # `tltool config init | head`
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
