"""What every command shares: the error mapping (one line, exit 2) and the arguments several commands take."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from tltool.device import DEVICE_NAMES
from tltool.errors import TltoolError

if TYPE_CHECKING:
    from tltool.config import Config

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


def load_run_config(path: str, overrides: list[str] | None) -> Config:
    """The config of a run: file + overrides, validated with the backbone and weights names (torchvision's, timm's).

    A name typo is one more line among the config's problems, before any data is read or weights loaded.
    """
    from tltool.catalog import BACKBONE_NAMES
    from tltool.config import load_config

    return load_config(path, overrides or [], names=BACKBONE_NAMES)
