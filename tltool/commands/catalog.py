"""`tltool models`: the backbones tltool can build, with their weights and support."""

from __future__ import annotations

from typing import Annotated

import typer

from tltool.commands.common import user_errors

commands = typer.Typer()


@commands.command(
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
