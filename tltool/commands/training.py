"""`tltool finetune` (and --resume, --nproc) and `tltool baseline`: runs of a config."""

from __future__ import annotations

from typing import Annotated

import typer

from tltool.commands.common import ConfigPath, Overrides, load_run_config, user_errors

commands = typer.Typer()


@commands.command(
    epilog="Example: tltool finetune configs/mobilenet_v2_frozen.yaml data.train=data/flowers train.epochs=5"
)
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

        cfg = load_run_config(config, overrides)
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


@commands.command(
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

        cfg = load_run_config(config, overrides)
        result = run_baseline(cfg, json_path=json_path, quiet=quiet, echo=typer.echo)
        typer.echo(format_baseline(result))
        if json_path:
            typer.echo(f"results written to {json_path}")
