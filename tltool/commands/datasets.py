"""Data tools: `tltool doctor` (check a dataset), `tltool shard` (write WebDataset shards), `tltool cache`."""

from __future__ import annotations

from typing import Annotated

import typer

from tltool.commands.common import user_errors

commands = typer.Typer()
cache_app = typer.Typer(
    help="List or clear the feature cache: frozen backbones' features kept for later runs.", no_args_is_help=True
)


@commands.command(
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


@commands.command(
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
