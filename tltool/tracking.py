"""MLflow tracking of a run (`log.mlflow`): params, per-epoch metrics, tags and artifacts; rank 0 only.

The MLflow run mirrors the run directory, it never replaces it: the config as params (dotted keys, JSON
values, so each pastes back as a `key=value` override), each `metrics.jsonl` record as metrics with
step = epoch (nested keys dotted: `loss_terms.ce`), tags, and at the end config.yaml, metrics.jsonl,
summary.json, the report and (`log.mlflow_checkpoints`) the checkpoints as artifacts.

Store: `$MLFLOW_TRACKING_URI` when set, else a SQLite store `mlruns/mlflow.db` beside the run directory
(`runs/mlruns/` for `runs/<name>/`), artifacts in `mlruns/artifacts/`: MLflow 3 keeps its file store for
backward compatibility only and made SQLite its default, and neither needs a server.

Exactly once: the MLflow run's id is kept in `<run>/mlflow.json`; a resume reopens that run. An epoch is
logged after its checkpoint is saved, in one `log_batch` whose `epoch` metric marks it logged; what is
logged is read back from the MLflow run itself (the steps of its `epoch` metric), so a resume, or the next
epoch after a failed upload, logs exactly the records of `metrics.jsonl` that the MLflow run lacks.

The store is checked before anything is trained: a missing package or an unreachable store is one line,
exit 2, in about `PROBE_TIMEOUT_S` (mlflow's own retries would take minutes). Once the run trains, a failed
upload is a warning (the run directory stays the record; the missed epochs go with the next upload).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tltool import __version__
from tltool.config import Config
from tltool.errors import TltoolError
from tltool.runstate import METRICS_FILE, write_text_atomic
from tltool.transfer import describe_method

if TYPE_CHECKING:
    from tltool.session import TrainingSession

MLFLOW_FILE = "mlflow.json"  # in the run directory: {"run_id", "tracking_uri", "experiment_id"}
PROBE_TIMEOUT_S = 5
# The start-up check: one try, a short timeout, whatever the user's settings (mlflow's default: 7 retries
# with exponential backoff and a 120 s timeout, minutes before it gives up).
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
# While the run trains: a few short retries, unless the user set their own.
RUN_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
MAX_PARAM_LENGTH = 6000  # mlflow's limit on a param's value (MAX_PARAM_VAL_LENGTH)
INSTALL_FIX = "pip install 'tltool[mlflow]' (or set log.mlflow=false)"


class TrackingError(TltoolError):
    """log.mlflow cannot work: mlflow is missing, or its store cannot be reached or written."""


def require_mlflow() -> Any:
    """The mlflow package, or a one-line error naming the pip command."""
    try:
        import mlflow
    except ImportError:
        raise TrackingError("log.mlflow needs the mlflow package", INSTALL_FIX) from None
    for name in ("mlflow.store.db.utils", "alembic"):  # the SQLite store's "creating tables" chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def local_store(run_dir: Path) -> Path:
    """The default store's folder: `mlruns/` beside the run directory."""
    return run_dir.resolve().parent / "mlruns"


def tracking_uri(run_dir: Path) -> str:
    """`$MLFLOW_TRACKING_URI`, else the SQLite database of `local_store(run_dir)`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_store(run_dir) / 'mlflow.db'}"


@contextlib.contextmanager
def http_settings(values: dict[str, str], force: bool) -> Iterator[None]:
    """mlflow's HTTP retry/timeout environment variables set for the block (`force`: over the user's), then put back."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if force or name not in os.environ:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one short line (mlflow's span several, with the request's URL and body)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: `section.key` -> the value (strings as they are, others as JSON)."""
    params = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            # (longer than mlflow allows: cut; config.yaml, an artifact of the run, holds it whole)
            params[f"{section}.{key}"] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return params


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl record as MLflow metrics: every number, nested keys dotted (`lr_groups.head`)."""
    metrics: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, bool | int | float):
            # (mlflow's name rule; a loss term's or an optimizer group's name could hold another character)
            metrics[re.sub(r"[^/\w.\- ]", "_", prefix)] = float(value)

    walk("", record)
    return metrics


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


class MlflowTracker:
    """The MLflow run of one tltool run, on rank 0: `connect()` before training, then `start(session)`,
    `log_epoch(record)` after each epoch's checkpoint, `finish(...)` at the end, `close()` in a `finally`."""

    def __init__(self, client: Any, uri: str, store: Path | None, quiet: bool) -> None:
        self.client = client
        self.uri = uri
        self.store = store  # the default local store's folder (None: $MLFLOW_TRACKING_URI)
        self.quiet = quiet
        self.run_id: str | None = None
        self.logged: set[int] = set()  # the epochs the MLflow run holds
        self.pending: list[dict[str, Any]] = []  # records not logged yet (a failed upload: retried next epoch)
        self.ended = False

    # --- before training ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, run_dir: Path, quiet: bool = False) -> MlflowTracker:
        """Import mlflow and check its store answers (bounded in time): one line, exit 2, if not."""
        require_mlflow()
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        uri = tracking_uri(run_dir)
        store = None if os.environ.get("MLFLOW_TRACKING_URI") else local_store(run_dir)
        try:
            with http_settings(PROBE_ENV, force=True):
                if store is not None:
                    store.mkdir(parents=True, exist_ok=True)
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
        except (MlflowException, RequestException, OSError) as exc:
            where = "MLFLOW_TRACKING_URI" if store is None else "the local store"
            if "MLFLOW_ALLOW_FILE_STORE" in str(exc):  # mlflow 3 refuses its legacy file store unless told
                raise TrackingError(
                    f"MLFLOW_TRACKING_URI={uri} is an MLflow file store, which this mlflow refuses (legacy)",
                    "use a database, e.g. sqlite:///mlruns.db (`mlflow migrate-filestore` moves old runs), or set "
                    "MLFLOW_ALLOW_FILE_STORE=true",
                ) from None
            raise TrackingError(
                f"cannot use the MLflow tracking store {uri} ({where}): {one_line(exc)}",
                "start the tracking server, or fix or unset MLFLOW_TRACKING_URI (unset: a local store beside the "
                "runs), or set log.mlflow=false",
            ) from None
        return cls(client, uri, store, quiet)

    @contextlib.contextmanager
    def _calls(self) -> Iterator[None]:
        with http_settings(RUN_ENV, force=False):
            yield

    # --- the run starts (or resumes) ------------------------------------------------------------------
    def start(self, session: TrainingSession) -> None:
        """Open the run's MLflow run (the one of `<run>/mlflow.json`, or a new one), log params and tags, and
        the epochs of `metrics.jsonl` it does not hold yet (a resume, or a run that turned log.mlflow on)."""
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        cfg, run_dir = session.cfg, session.run_dir
        try:
            with self._calls():
                run = self._open_run(cfg, run_dir, resumed=session.resumed is not None)
                self.run_id = run.info.run_id
                self.logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, "epoch")}
                self._log_params_and_tags(session, run.data.params)
                experiment = self.client.get_experiment(run.info.experiment_id).name
        except (MlflowException, RequestException, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking store {self.uri}: {one_line(exc)}",
                "check the store (or the server's log), or set log.mlflow=false",
            ) from None
        self.pending = [r for r in session.state.history if r["epoch"] not in self.logged]
        again = f", {len(self.logged)} epoch(s) already logged" if self.logged else ""
        where = f" (mlflow ui --backend-store-uri {self.uri})" if self.store is not None else ""
        if not self.quiet:
            print(f"mlflow: run {self.run_id} in experiment '{experiment}' at {self.uri}{again}{where}", flush=True)
        self._upload_pending()

    def _open_run(self, cfg: Config, run_dir: Path, resumed: bool) -> Any:
        """A resumed run's MLflow run (from mlflow.json), else a new one, recorded in mlflow.json."""
        from mlflow.exceptions import MlflowException

        saved_path = run_dir / MLFLOW_FILE
        if resumed and saved_path.exists():
            try:
                saved = json.loads(saved_path.read_text())
                run = self.client.get_run(saved["run_id"])
                if run.info.lifecycle_stage != "deleted":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                    return run
                warn(f"MLflow run {saved['run_id']} ({saved_path}) is deleted: this run logs to a new MLflow run")
            except MlflowException:
                warn(
                    f"MLflow run of {saved_path} not found at {self.uri}: this run logs to a new MLflow run "
                    "(with every epoch of metrics.jsonl)"
                )
            except (ValueError, KeyError, TypeError):
                warn(f"{saved_path} is damaged: this run logs to a new MLflow run")
        name = cfg.log.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"the MLflow experiment '{name}' is deleted at {self.uri}",
                "restore it (mlflow experiments restore) or choose another log.mlflow_experiment",
            )
        if experiment is None:
            artifacts = str(self.store / "artifacts") if self.store is not None else None
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=cfg.run.name)
        record = {"run_id": run.info.run_id, "tracking_uri": self.uri, "experiment_id": experiment_id}
        try:
            write_text_atomic(saved_path, json.dumps(record, indent=2) + "\n")
        except BaseException:  # (a run directory that cannot keep the id: no MLflow run nobody can resume)
            with contextlib.suppress(Exception):
                self.client.delete_run(run.info.run_id)
            raise
        return run

    def _log_params_and_tags(self, session: TrainingSession, existing: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        cfg = session.cfg
        params = config_params(cfg)
        # MLflow params cannot change: a resume that changed a resumable key (train.epochs, ...) says so in a tag.
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        tags = {
            "tltool.version": __version__,
            "tltool.backbone": cfg.model.backbone,
            "tltool.method": describe_method(cfg, session.plan.base_frozen),
            "tltool.loss": " + ".join(session.objective.names),
            "tltool.adapt": cfg.adapt.method,
            "tltool.run_dir": str(session.run_dir.resolve()),
            **{f"tltool.resumed_with.{k}": v for k, v in changed.items()},
        }
        self.client.log_batch(
            self.run_id,
            params=[Param(k, v) for k, v in params.items() if k not in existing],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def describe(self) -> dict[str, Any]:
        """summary.json's `mlflow` entry."""
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    # --- each epoch -----------------------------------------------------------------------------------
    def log_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record, once its checkpoint is saved (with any earlier one whose upload failed)."""
        if record["epoch"] not in self.logged:
            self.pending.append(record)
        self._upload_pending()

    def _upload_pending(self) -> None:
        from mlflow.entities import Metric

        try:
            with self._calls():
                while self.pending:
                    record = self.pending[0]
                    stamp = int(time.time() * 1000)
                    epoch = record["epoch"]
                    metrics = [Metric(k, v, stamp, epoch) for k, v in record_metrics(record).items()]
                    self.client.log_batch(self.run_id, metrics=metrics)  # one request: the epoch whole, or not
                    self.logged.add(epoch)
                    self.pending.pop(0)
        except Exception as exc:  # noqa: BLE001 (any failure of the store: training goes on, metrics.jsonl has it)
            warn(
                f"MLflow logging failed at {self.uri} ({one_line(exc)}); epoch(s) "
                f"{', '.join(str(r['epoch']) for r in self.pending)} will be sent with the next epoch or on resume"
            )

    # --- the end --------------------------------------------------------------------------------------
    def finish(self, cfg: Config, run_dir: Path, status: str = "FINISHED", report: Path | None = None) -> None:
        """Upload the run's files (config, metrics, summary, report, checkpoints when asked) and end the MLflow
        run with `status` (FINISHED, or KILLED for a stopped run, which a resume reopens)."""
        if self.run_id is None:
            return
        self._upload_pending()
        files = [run_dir / name for name in ("config.yaml", "classes.json", METRICS_FILE, "summary.json")]
        if cfg.log.mlflow_checkpoints:
            files += [run_dir / "checkpoints" / name for name in ("last.pt", "best.pt", "wise.pt")]
        try:
            with self._calls():
                for path in files:
                    if path.is_file():
                        folder = "checkpoints" if path.suffix == ".pt" else None
                        self.client.log_artifact(self.run_id, str(path), folder)
                if report is not None and report.is_dir():
                    self.client.log_artifacts(self.run_id, str(report), "report")
                self.client.set_terminated(self.run_id, status)
            self.ended = True
        except Exception as exc:  # noqa: BLE001 (the run itself is done and saved)
            warn(f"MLflow: uploading the run's files to {self.uri} failed ({one_line(exc)})")

    def close(self) -> None:
        """In finetune's `finally`: an MLflow run left open by an error is marked FAILED."""
        if self.run_id is None or self.ended:
            return
        self.ended = True
        with contextlib.suppress(Exception), self._calls():
            self.client.set_terminated(self.run_id, "FAILED")
