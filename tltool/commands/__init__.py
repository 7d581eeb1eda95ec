"""The commands of `tltool`, by group: thin Typer commands over the stage functions; `tltool/cli.py` assembles them.

`common.py`: the error mapping every command's body runs in (`user_errors`) and the arguments several commands
share. `training.py`: finetune, baseline. `inference.py`: eval, predict, report, calibrate. `deploy.py`: export,
serve. `datasets.py`: doctor, shard, cache list|clear. `sweeps.py`: tune, lr-find. `catalog.py`: models.
`configs.py`: config show|init|keys|schema. Each module's `commands` (a Typer) holds its commands (`datasets` and
`configs` also a group of sub-commands). No module here imports torch at its top level: `tltool --help` stays fast.
"""
