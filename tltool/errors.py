"""User-facing errors: one line on stderr, exit code 2 (DESIGN.md, "Exit codes")."""

from __future__ import annotations


class TltoolError(Exception):
    """A problem the user can fix. ``what`` says what is wrong, ``fix`` what to do about it.

    ``details`` are extra lines (e.g. every problem of a config file) printed under the first line.
    """

    exit_code = 2

    def __init__(self, what: str, fix: str = "", details: list[str] | None = None) -> None:
        self.what = what
        self.fix = fix
        self.details = list(details or [])
        super().__init__(self.message())

    def message(self) -> str:
        line = f"error: {self.what}"
        if self.fix:
            line += f" — {self.fix}"
        return "\n".join([line, *(f"  {d}" for d in self.details)])


class ConfigError(TltoolError):
    """The config file or a KEY=VALUE override is wrong."""


class DataError(TltoolError):
    """The dataset folder, an image or the split is wrong."""


class ModelError(TltoolError):
    """The backbone name, its weights or a weights file is wrong or missing."""


class CheckpointError(TltoolError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the config."""


class TrainingError(TltoolError):
    """Training cannot go on (non-finite loss, unwritable checkpoint)."""


class ExportError(TltoolError):
    """An export failed or its parity check did not hold."""


class ReportError(TltoolError):
    """The run directory cannot be reported on (missing, not a run, unreadable files, no matplotlib)."""
