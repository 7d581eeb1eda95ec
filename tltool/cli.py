"""The `tltool` command line: thin Typer commands over the stage functions.

A `TltoolError` becomes one line on stderr and exit code 2; anything else is a bug (exit 1, traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from tltool import __version__
from tltool.device import DEVICE_NAMES, check_device
from tltool.errors import TltoolError

if TYPE_CHECKING:
    from tltool.config import Config

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
cache_app = typer.Typer(
    help="List or clear the feature cache: frozen backbones' features kept for later runs.", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")

ConfigPath = Annotated[str, typer.Argument(help="YAML config file.", show_default=False)]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="KEY=VALUE overrides of config keys, e.g. train.epochs=3 model.backbone=resnet50.", show_default=False
    ),
]
CheckpointPath = Annotated[str, typer.Argument(help="A tltool checkpoint (runs/<name>/checkpoints/best.pt).")]
Device = Annotated[str, typer.Option("--device", help=f"{DEVICE_NAMES}.")]
WiseAlpha = Annotated[
    float | None,
    typer.Option(
        "--wise-alpha",
        help="WiSE-FT: use (1-A) x starting + A x fine-tuned weights, 0 <= A <= 1 (a checkpoint of a run "
        "trained with train.wise_alpha set).",
        show_default=False,
    ),
]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors into one line on stderr and exit code 2; Ctrl-C into exit 130."""
    try:
        yield
    except TltoolError as exc:
        message = exc.message()
        rank = os.environ.get("RANK")
        if rank not in (None, "0") and os.environ.get("WORLD_SIZE", "1") != "1":
            message = f"[rank {rank}] {message}"  # under torchrun every rank may report; rank 0's is unmarked
        typer.echo(message, err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _load_run_config(path: str, overrides: list[str] | None) -> Config:
    """The config of a run: file + overrides, validated with the backbone and weights names (torchvision's, timm's).

    A name typo is one more line among the config's problems, before any data is read or weights loaded.
    """
    from tltool.catalog import BACKBONE_NAMES
    from tltool.config import load_config

    return load_config(path, overrides or [], names=BACKBONE_NAMES)


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
    resume_changed_data: Annotated[
        bool,
        typer.Option(
            "--resume-changed-data",
            help="With --resume: continue although images were added, removed or resized since the checkpoint "
            "(refused otherwise). The checkpoint's val split is kept: its val images still there stay in val, "
            "every other image trains.",
        ),
    ] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="Train with N data-parallel processes on this machine (starts torchrun --standalone; "
            "one GPU each on CUDA). For several machines, run torchrun yourself (see the README).",
        ),
    ] = None,
) -> None:
    """Fine-tune a torchvision or timm backbone on a folder of images (new head, frozen features by default).

    One run at a time per run directory: a second one is refused (exit 2).

    Ctrl-C, SIGTERM, SIGHUP, SIGUSR1: stops at the next step, saved; exit 128+N (130, 143, 129, 138).

    run.time_limit: stops, saved, before the limit; exit 75. Both print the command that continues the run.
    """
    with user_errors():
        from tltool.train import finetune as run_finetune

        cfg = _load_run_config(config, overrides)
        if resume_changed_data and not resume:
            from tltool.errors import ConfigError

            raise ConfigError("--resume-changed-data only applies to a resumed run", "add --resume auto (or a path)")
        if nproc is not None:
            from tltool.distributed import launch, launched
            from tltool.errors import ConfigError

            if launched():
                raise ConfigError("--nproc under torchrun: the processes are already started", "drop --nproc")
            args = ["finetune", config, *(overrides or [])]
            args += (["--resume", resume] if resume else []) + (["--dry-run"] if dry_run else [])
            args += ["--quiet"] if quiet else []
            args += ["--resume-changed-data"] if resume_changed_data else []
            raise typer.Exit(launch(nproc, args))
        summary = run_finetune(cfg, resume=resume, dry_run=dry_run, quiet=quiet, config_path=config,
                               overrides=overrides, resume_changed_data=resume_changed_data)  # fmt: skip
        if summary.get("dry_run") or summary.get("finished") or summary.get("rank"):
            return
        from tltool.runlog import format_summary

        typer.echo(format_summary(summary))


Threshold = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        min=0.0,
        max=1.0,
        help="Multilabel models: a class is predicted when its sigmoid p >= this (every class); default: per-class "
        "thresholds chosen on the run's val split (each maximizes F1 there).",
    ),
]


@app.command("eval", epilog="Example: tltool eval runs/flowers/checkpoints/best.pt --data data/flowers/test")
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


@app.command(
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


@app.command(
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


@app.command(
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


@app.command(
    epilog="Example: tltool tune configs/mobilenet_v2_frozen.yaml data.train=data/flowers --trials 20 "
    "'train.lr=loguniform(1e-4,1e-1)' 'train.label_smoothing=choice(0,0.1)' --out runs/flowers-tune"
)
def tune(
    config: ConfigPath,
    items: Annotated[
        list[str] | None,
        typer.Argument(
            help="KEY=DIST items of the search space: loguniform(a,b), uniform(a,b), int(a,b), choice(a,b,...) "
            "(values read as YAML); any other KEY=VALUE overrides the base config for every trial.",
            show_default=False,
        ),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", "-n", min=1, help="Trials the sweep runs in all.")] = 20,
    space: Annotated[
        str | None,
        typer.Option(
            "--space", help="A YAML file of `key: dist(...)` lines (the command line's items win).", show_default=False
        ),  # fmt: skip
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="The sweep's directory (study.db, trial-NNNN/, best.yaml); default: runs/<run.name>-tune.",
            show_default=False,
        ),  # fmt: skip
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="The per-epoch metric to optimize (losses are minimized).")
    ] = "val_acc1",
) -> None:
    """Sweep hyperparameters with Optuna (TPE sampler, median pruning per epoch); each trial a normal run.

    The study is kept in OUT/study.db: the same command again continues an interrupted sweep (finished trials
    are kept; one that was running is run again). Writes OUT/best.yaml, ready for `tltool finetune`, and plots.
    """
    with user_errors():
        import shlex

        from tltool.catalog import BACKBONE_NAMES
        from tltool.tune import format_result, run_tune

        command = shlex.join(["tltool", *sys.argv[1:]]) if sys.argv[1:2] == ["tune"] else "the same tltool tune command"
        result = run_tune(config, items or [], trials, space, out, metric, names=BACKBONE_NAMES, echo=typer.echo,
                          command=command)  # fmt: skip
        typer.echo(format_result(result))


@config_app.command("show", epilog="Example: tltool config show configs/resnet50_full.yaml train.lr=1e-4")
def config_show(config: ConfigPath, overrides: Overrides = None) -> None:
    """Print the resolved config (file + overrides + every default) as YAML."""
    with user_errors():
        typer.echo(_load_run_config(config, overrides).to_yaml(), nl=False)


@config_app.command("init", epilog="Example: tltool config init > my.yaml")
def config_init() -> None:
    """Print a commented starter config with every key at its default."""
    from tltool.config_docs import starter_yaml

    typer.echo(starter_yaml(), nl=False)


@config_app.command("keys", epilog="Example: tltool config keys")
def config_keys() -> None:
    """Print every config key with its default and meaning (a Markdown table)."""
    from tltool.config_docs import reference_markdown

    typer.echo(reference_markdown(), nl=False)


@config_app.command("schema", epilog="Example: tltool config schema > configs/schema.json")
def config_schema() -> None:
    """Print the JSON Schema of a config, for editors to complete and check keys (configs/schema.json)."""
    import json

    from tltool.config_docs import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command(
    epilog="Example: tltool doctor data/flowers   |   tltool doctor data/flowers --json > doctor.json"
    "   |   tltool doctor data/train.csv --val data/val.csv   |   tltool doctor data/tags.csv --task multilabel"
    "   |   tltool doctor 'shards/train-{000000..000003}.tar' --val 'shards/val-{000000..000000}.tar'"
)
def doctor(
    data_dir: Annotated[
        str,
        typer.Argument(
            help="The dataset: a folder of class sub-folders, one with train/ and val/ inside, a .csv/.tsv file, "
            "or .tar shards (a pattern, as data.train)."
        ),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print the findings as JSON (for scripts).")] = False,
    deep: Annotated[
        bool, typer.Option("--deep", help="Decode every image (slower), not only its header: finds truncated files.")
    ] = False,
    val: Annotated[
        str | None,
        typer.Option("--val", help="A label file dataset's validation label file, or the val shards (as data.val)."),
    ] = None,
    path_column: Annotated[str, typer.Option("--path-column", help="Label files: as data.path_column.")] = "path",
    label_column: Annotated[str, typer.Option("--label-column", help="Label files: as data.label_column.")] = "label",
    task: Annotated[
        str,
        typer.Option(
            "--task", help="As data.task: multilabel reads each label cell as classes separated by --label-delimiter."
        ),
    ] = "multiclass",
    label_delimiter: Annotated[
        str, typer.Option("--label-delimiter", help="--task multilabel: as data.label_delimiter.")
    ] = "|",
) -> None:
    """Check a dataset before training: layout, images per class, unreadable files, duplicates, sizes.

    --task multilabel counts each image for each of its classes and lists the label sets; shards are listed
    with their samples and classes (the .cls members; the images inside are not opened).

    Exit code 2 (after the report) when something would break training; warnings alone keep exit code 0.
    """
    with user_errors():
        from tltool.doctor import diagnose, format_diagnosis

        diagnosis = diagnose(
            data_dir,
            deep=deep,
            val=val,
            path_column=path_column,
            label_column=label_column,
            task=task,
            label_delimiter=label_delimiter,
        )
    if json_output:
        import json

        typer.echo(json.dumps(diagnosis.to_dict(), indent=2))
    else:
        typer.echo(format_diagnosis(diagnosis))
    if diagnosis.problems:
        count = len(diagnosis.problems)
        typer.echo(
            f"error: {count} problem{'s' if count > 1 else ''} in {data_dir} would break training — "
            "fix them and run tltool doctor again",
            err=True,
        )
        raise typer.Exit(2)


@app.command(
    epilog="Example: tltool shard data/flowers shards/flowers --shard-size 1000 --val-split 0.2   "
    "(then data.train=shards/flowers/train-{000000..000003}.tar data.val=shards/flowers/val-{000000..000000}.tar)"
)
def shard(
    source: Annotated[str, typer.Argument(help="A folder of class sub-folders, or a .csv/.tsv label file.")],
    out: Annotated[str, typer.Argument(help="A new (or empty) folder for the shards.")],
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard.")] = 1000,
    val_split: Annotated[
        float, typer.Option("--val-split", help="Fraction of each class written to val-*.tar (0: none).")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the val split and the shuffled train order.")] = 0,
    path_column: Annotated[str, typer.Option("--path-column", help="Label files: as data.path_column.")] = "path",
    label_column: Annotated[str, typer.Option("--label-column", help="Label files: as data.label_column.")] = "label",
) -> None:
    """Write WebDataset .tar shards (train-NNNNNN.tar, val-NNNNNN.tar, classes.json, shards.json) of a dataset.

    Each sample is <key>.<ext> (the image file's bytes) and <key>.cls (its class index); the train samples are
    shuffled (seeded) before they are cut into shards, so every shard mixes the classes.
    """
    with user_errors():
        from pathlib import Path

        from tltool.data.shards import write_shards

        index = write_shards(source, out, shard_size, val_split, seed, path_column, label_column)
    for name in ("train", "val"):
        if name in index:
            entry = index[name]
            typer.echo(
                f"{name}: {entry['samples']} samples in {entry['shards']} shard(s): "
                f"data.{name}={Path(out) / entry['pattern']}"
            )
    typer.echo(f"classes: {len(index['classes'])} ({Path(out) / 'classes.json'})")


@app.command(epilog="Example: tltool report runs/flowers   (then open runs/flowers/report/report.html)")
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


@app.command(epilog="Example: tltool calibrate runs/flowers/checkpoints/best.pt --data data/flowers/val -o cal.pt")
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


@app.command(
    epilog="Example: tltool baseline configs/mobilenet_v2_frozen.yaml data.train=data/flowers --json baseline.json"
)
def baseline(
    config: ConfigPath,
    overrides: Overrides = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or features line.")] = False,
) -> None:
    """Linear probe, kNN and nearest class mean on the frozen backbone's features: what fine-tuning must beat.

    The L2 penalty and k are chosen on 20% of the train images held out; val is only scored. Writes no run.
    """
    with user_errors():
        from tltool.baseline import format_baseline, run_baseline

        cfg = _load_run_config(config, overrides)
        result = run_baseline(cfg, json_path=json_path, quiet=quiet, echo=typer.echo)
        typer.echo(format_baseline(result))
        if json_path:
            typer.echo(f"results written to {json_path}")


@app.command(
    "lr-find",
    epilog="Example: tltool lr-find configs/mobilenet_v2_frozen.yaml data.train=data/flowers --out lr-find/flowers",
)
def lr_find(
    config: ConfigPath,
    overrides: Overrides = None,
    start: Annotated[float, typer.Option("--start", help="First learning rate (train.lr) of the range.")] = 1e-7,
    end: Annotated[float, typer.Option("--end", help="Last learning rate of the range.")] = 10.0,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps from --start to --end (exponential).")] = 100,
    out: Annotated[
        str | None,
        typer.Option("--out", help="Folder for lr_find.png/.json/.csv; default lr-find/<run.name> (never the run's)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the result lines.")] = False,
) -> None:
    """LR range test on the run's real session (model, freeze plan, feature cache, optimizer groups, loss terms):
    the LR grows exponentially per step; stops when the smoothed loss passes 4x its minimum.

    Prints the steepest-descent suggestion (and the minimum / 10) and the override to use. Writes nothing into
    the run directory and saves no model.
    """
    with user_errors():
        from tltool.lrfind import check_range, format_result, run_lr_find

        check_range(start, end, steps)
        cfg = _load_run_config(config, overrides)
        result = run_lr_find(cfg, start, end, steps, out, quiet, echo=typer.echo)
        typer.echo(format_result(result))


@app.command(
    epilog="Example: tltool models 'resnet*'   |   tltool models mobilenet --json > models.json   |   "
    "tltool models 'timm/convnext*'"
)
def models(
    pattern: Annotated[
        str | None,
        typer.Argument(
            help="A glob ('resnet*', 'vit_?_16') or substring ('mobilenet') of names; 'timm/...' lists timm's.",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of the table.")] = False,
) -> None:
    """List torchvision backbones (timm's with 'timm/...') and their weights, parameters, ImageNet top-1, support."""
    with user_errors():
        from tltool.catalog import catalog, format_catalog

        entries = catalog(pattern)
    if json_output:
        import json

        typer.echo(json.dumps([entry.to_dict() for entry in entries], indent=2))
    else:
        typer.echo(format_catalog(entries))


CacheDir = Annotated[
    str | None,
    typer.Option(
        "--dir",
        help="The cache's folder (as train.feature_cache_dir; default $TLTOOL_CACHE_DIR/features, else "
        "$XDG_CACHE_HOME/tltool/features, else ~/.cache/tltool/features).",
        show_default=False,
    ),
]


def _open_cache(folder: str | None):  # noqa: ANN202  (tltool.featurestore.FeatureStore, imported lazily)
    from tltool.errors import ConfigError
    from tltool.featurestore import FeatureStore, budget_mb, store_root
    from tltool.files import path_problem

    root, _ = store_root(folder)
    problem = path_problem(root, "folder") if root.exists() or root.is_symlink() else None
    if problem is not None:
        raise ConfigError(f"feature cache {root} {problem}", "give the cache's folder with --dir")
    return FeatureStore(root, budget_mb() * 2**20)


@cache_app.command("list", epilog="Example: tltool cache list   |   tltool cache list --json")
def cache_list(
    folder: CacheDir = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of the table.")] = False,
) -> None:
    """The cache's entries, most recently used first: key, backbone, part, transform, images, size, last use."""
    with user_errors():
        from tltool.featurestore import format_entries

        store = _open_cache(folder)
        if json_output:
            import json

            typer.echo(json.dumps([entry.to_dict() for entry in store.entries()], indent=2))
        else:
            typer.echo(format_entries(store))


@cache_app.command("clear", epilog="Example: tltool cache clear --all   |   tltool cache clear 3f2a9c41")
def cache_clear(
    key: Annotated[
        str | None, typer.Argument(help="The entry to remove: its key or a unique start of it.", show_default=False)
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    folder: CacheDir = None,
) -> None:
    """Remove one entry (KEY) or all (--all); an entry a run is writing is removed once it is written."""
    with user_errors():
        from tltool.errors import ConfigError
        from tltool.files import size_text

        if (key is None) == (not everything):
            raise ConfigError("say what to clear: a KEY or --all, not both", "`tltool cache list` shows the keys")
        store = _open_cache(folder)
        keys = None
        if key is not None:
            keys = [entry.key for entry in store.entries() if entry.key.startswith(key)]
            if not keys:
                raise ConfigError(f"no feature cache entry {key} in {store.root}", "`tltool cache list` shows the keys")
            if len(keys) > 1:
                raise ConfigError(f"{key} starts {len(keys)} entries' keys", "give more of the key")
        removed = store.clear(keys)
        count = f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'}"
        typer.echo(f"removed {count} ({size_text(sum(e.size for e in removed))}) from {store.root}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # `tltool config init | head`
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
