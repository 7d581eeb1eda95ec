"""`tltool tune` (an Optuna sweep of runs) and `tltool lr-find` (the LR range test)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tltool.commands.common import ConfigPath, Overrides, load_run_config, user_errors

commands = typer.Typer()


@commands.command(
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


@commands.command(
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
        cfg = load_run_config(config, overrides)
        result = run_lr_find(cfg, start, end, steps, out, quiet, echo=typer.echo)
        typer.echo(format_result(result))
