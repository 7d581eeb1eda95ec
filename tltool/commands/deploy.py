"""`tltool export` (deployable files, parity-checked) and `tltool serve` (an HTTP prediction server)."""

from __future__ import annotations

from typing import Annotated

import typer

from tltool.commands.common import CheckpointPath, Device, WiseAlpha, user_errors
from tltool.device import DEVICE_NAMES, check_device

commands = typer.Typer()


@commands.command(
    epilog="Example: tltool export runs/flowers/checkpoints/best.pt --format all --benchmark   |   "
    "tltool export runs/flowers/checkpoints/best.pt -f onnx --include-preprocessing --softmax -o flowers.onnx"
)
def export(
    checkpoint: CheckpointPath,
    format: Annotated[
        str, typer.Option("--format", "-f", help="onnx, torchscript, exported-program (.pt2), safetensors or all.")
    ] = "onnx",
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Output file (with --format all: the shared stem); default: beside the checkpoint."
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Images for the parity check; default: the run's val split.")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Check every file against PyTorch before naming it.")
    ] = True,
    include_preprocessing: Annotated[
        bool,
        typer.Option(
            "--include-preprocessing",
            help="The graph takes uint8 RGB pixels (resized and cropped by the caller) and normalizes them itself.",
        ),
    ] = False,
    input_layout: Annotated[
        str | None,
        typer.Option("--input-layout", help="With --include-preprocessing: nhwc (N x H x W x 3, default) or nchw."),
    ] = None,
    softmax: Annotated[bool, typer.Option("--softmax", help="Output probabilities instead of logits.")] = False,
    dynamic_size: Annotated[
        bool, typer.Option("--dynamic-size", help="ONNX / ExportedProgram accept any height and width.")
    ] = False,
    benchmark: Annotated[
        bool, typer.Option("--benchmark", help="Print batch-1 latency and batch-32 throughput vs eager PyTorch.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help=f"Device for --benchmark: {DEVICE_NAMES}.")] = "auto",
    wise_alpha: WiseAlpha = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output that is not a tltool export of its format.")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="int8: ONNX Runtime static quantization (ONNX only), accuracy-checked on val instead of parity.",
        ),
    ] = None,
    calibration_images: Annotated[
        int | None,
        typer.Option("--calibration-images", help="With --quantize: training images to calibrate on (default 200)."),
    ] = None,
    calibration_data: Annotated[
        str | None,
        typer.Option(
            "--calibration-data", help="With --quantize: calibrate on this image folder, not the training split."
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option("--max-drop", help="With --quantize: most top-1 points int8 may lose on val (default 1.0)."),
    ] = None,
) -> None:
    """Write deployable files (ONNX, TorchScript, ExportedProgram, safetensors) with classes and preprocessing inside.

    Each file is checked against PyTorch on real images at two batch sizes before it gets its name.
    """
    with user_errors():
        check_device(device, "--device")
        from tltool.export import ExportOptions, run_export
        from tltool.export.quantize import int8_options

        int8 = int8_options(quantize, calibration_images, max_drop, calibration_data)
        options = ExportOptions(format=format, output=output, data=data, verify=verify,
                                include_preprocessing=include_preprocessing, input_layout=input_layout, softmax=softmax,
                                dynamic_size=dynamic_size, benchmark=benchmark, device=device, wise_alpha=wise_alpha,
                                force=force, quantize=quantize, int8=int8)  # fmt: skip
        run_export(checkpoint, options, echo=typer.echo)


@commands.command(
    epilog="Example: tltool serve runs/flowers/checkpoints/best.pt --port 8000   then   "
    "curl --data-binary @photo.jpg http://127.0.0.1:8000/predict"
)
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="A tltool checkpoint (.pt) or a file tltool export wrote (.onnx .torchscript.pt .pt2 .safetensors).",
            show_default=False,
        ),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: a free one, printed at start).")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most images in one model call.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", help="How long the first queued image waits for others to join its batch.")
    ] = 5.0,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest request body in MiB; larger ones get 413.")
    ] = 20.0,
    topk: Annotated[int, typer.Option("--topk", "-k", help="Labels per image unless a request asks ?topk=N.")] = 5,
    device: Device = "auto",
) -> None:
    """Serve a checkpoint or an exported model over HTTP: POST /predict, GET /health, GET /metadata.

    /predict takes one image as the raw body or several as multipart files and answers with the JSON list
    tltool predict --json prints. Concurrent requests are batched into shared model calls (--max-batch,
    --max-wait-ms). SIGTERM or Ctrl-C stops it gracefully (exit 0). Needs the serve extra of tltool (FastAPI, uvicorn).
    """
    with user_errors():
        check_device(device, "--device")
        from tltool.serve import ServeSettings, run_serve

        settings = ServeSettings(host, port, max_batch, max_wait_ms, max_upload_mb, topk)
        run_serve(model, settings, device, echo=lambda text: typer.echo(text, err=True))
