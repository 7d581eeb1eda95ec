"""`tltool config show|init|keys|schema`: resolved configs, a starter config, the key reference, the JSON Schema."""

from __future__ import annotations

import typer

from tltool.commands.common import ConfigPath, Overrides, load_run_config, user_errors

config_app = typer.Typer(help="Show or create configs.", no_args_is_help=True)


@config_app.command("show", epilog="Example: tltool config show configs/resnet50_full.yaml train.lr=1e-4")
def config_show(config: ConfigPath, overrides: Overrides = None) -> None:
    """Print the resolved config (file + overrides + every default) as YAML."""
    with user_errors():
        typer.echo(load_run_config(config, overrides).to_yaml(), nl=False)


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
