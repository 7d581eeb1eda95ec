"""log.mlflow: a run read back from a real MLflow store equals its run directory; resume logs each epoch once;
a real `mlflow server`; only rank 0 logs; the one-line errors (no mlflow, an unreachable or hanging tracking
server, a refused file store)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import run_overrides, write_config
from tltool import __version__
from tltool import session as session_module
from tltool.cli import app
from tltool.config import load_config
from tltool.tracking import config_params, record_metrics
from tltool.train import Interrupted, finetune

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own MLFLOW_TRACKING_URI must not send test runs anywhere."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store with MLflow's tables made once (its schema migrations take ~5 s per new store)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def seed_store(run_dir: Path, empty_store: Path) -> None:
    """Put a copy of `empty_store` where the run's default store goes (mlruns/ beside the run directory)."""
    (run_dir.parent / "mlruns").mkdir(parents=True)
    shutil.copyfile(empty_store, run_dir.parent / "mlruns" / "mlflow.db")


def run(run_dir: Path, data: Path, *extra: str, resume: str | None = None) -> dict:
    overrides = run_overrides(run_dir, data, "log.mlflow=true", *extra)
    return finetune(load_config(None, overrides), resume=resume, quiet=True)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def flat(record: dict, prefix: str = "") -> dict[str, float]:
    """A metrics.jsonl record's numbers under dotted keys (written here, not imported: the test's own reading)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        elif isinstance(value, int | float):
            out[name] = float(value)
    return out


def assert_metrics_equal(client: MlflowClient, run_id: str, run_dir: Path) -> None:
    """Every key of every metrics.jsonl record is in the MLflow run at step = epoch, once, with its value."""
    lines = records(run_dir)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in lines:
        for key, value in flat(record).items():
            expected.setdefault(key, []).append((record["epoch"], value))
    assert set(client.get_run(run_id).data.metrics) == set(expected)
    for key, values in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == values, key


def test_a_run_read_back_from_mlflow_equals_its_run_directory(tmp_path: Path, dataset: Path) -> None:
    run_dir = tmp_path / "runs" / "a"
    summary = run(run_dir, dataset, "log.mlflow_checkpoints=true", "log.report=true", "log.mlflow_experiment=exp1")
    saved = json.loads((run_dir / "mlflow.json").read_text())
    # The default store: SQLite in mlruns/ beside the run directory, artifacts in mlruns/artifacts/.
    store = tmp_path / "runs" / "mlruns"
    assert saved["tracking_uri"] == f"sqlite:///{store / 'mlflow.db'}" and (store / "mlflow.db").is_file()
    assert summary["mlflow"] == {"run_id": saved["run_id"], "tracking_uri": saved["tracking_uri"]}
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    mlflow_run = client.get_run(saved["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "tltool-run"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "exp1"
    assert len(records(run_dir)) == 2
    assert_metrics_equal(client, saved["run_id"], run_dir)
    # Params: every key of the resolved config.yaml, dotted; each value reads back as the config's (JSON).
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    params = mlflow_run.data.params
    expected_keys = {f"{section}.{key}" for section, values in config.items() for key in values}
    assert set(params) == expected_keys
    for section, values in config.items():
        for key, value in values.items():
            param = params[f"{section}.{key}"]
            assert (param if isinstance(value, str) else json.loads(param)) == value, (section, key)
    assert params["train.lr"] == "0.01" and params["model.backbone"] == "resnet18" and params["log.mlflow"] == "true"
    tags = mlflow_run.data.tags
    assert tags["tltool.backbone"] == "resnet18" and tags["tltool.version"] == __version__
    assert tags["tltool.method"] == summary["method"] and tags["tltool.loss"] == "ce"
    assert tags["tltool.run_dir"] == str(run_dir.resolve())
    # Artifacts: the run's files (the same bytes), the report, and the checkpoints (log.mlflow_checkpoints).
    top = {f.path for f in client.list_artifacts(saved["run_id"])}
    assert {"summary.json", "config.yaml", "metrics.jsonl", "classes.json", "report", "checkpoints"} <= top
    assert {f.path for f in client.list_artifacts(saved["run_id"], "checkpoints")} == {
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    }
    assert "report/report.html" in {f.path for f in client.list_artifacts(saved["run_id"], "report")}
    local = Path(client.download_artifacts(saved["run_id"], "summary.json", str(tmp_path)))
    assert local.read_bytes() == (run_dir / "summary.json").read_bytes()
    assert str(store / "artifacts") in mlflow_run.info.artifact_uri


class Crash(Exception):
    pass


def test_a_stopped_then_crashed_run_resumed_logs_each_epoch_once_into_one_mlflow_run(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path
) -> None:
    """SIGTERM during epoch 1's save: the run stops after epoch 1 (logged), the MLflow run KILLED. The resume
    crashes after epoch 2's checkpoint and before its upload: the MLflow run holds epoch 1 only, FAILED. The
    second resume continues that MLflow run, sends epoch 2 from metrics.jsonl, then 3, never epoch 1 again."""
    run_dir = tmp_path / "c"
    seed_store(run_dir, empty_store)
    real_save = session_module.save_atomic

    def fault_after(epoch: int, fault):
        def save(payload, path):
            real_save(payload, path)
            if payload["epoch"] == epoch:
                fault()

        monkeypatch.setattr(session_module, "save_atomic", save)

    def crash():
        raise Crash()

    fault_after(1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted) as stopped:
        run(run_dir, dataset, "train.epochs=3")
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    saved = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    assert client.get_run(saved["run_id"]).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(saved["run_id"], "val_loss")] == [1]

    fault_after(2, crash)
    with pytest.raises(Crash):
        run(run_dir, dataset, "train.epochs=3", resume="auto")
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    crashed = client.get_run(saved["run_id"])
    assert crashed.info.status == "FAILED"  # (finetune's `finally`)
    assert [m.step for m in client.get_metric_history(saved["run_id"], "val_loss")] == [1]
    assert [r["epoch"] for r in records(run_dir)] == [1, 2]

    summary = run(run_dir, dataset, "train.epochs=3", resume="auto")
    assert summary["mlflow"]["run_id"] == saved["run_id"]
    runs = client.search_runs([crashed.info.experiment_id])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]  # one MLflow run
    assert client.get_run(saved["run_id"]).info.status == "FINISHED"
    assert [r["epoch"] for r in records(run_dir)] == [1, 2, 3]
    assert_metrics_equal(client, saved["run_id"], run_dir)  # each key: steps [1, 2, 3], each once


def test_a_failed_upload_is_a_warning_and_the_epoch_goes_with_the_next(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, empty_store: Path
) -> None:
    real_log_batch = MlflowClient.log_batch
    failures = {"left": 1}

    def flaky(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        if metrics and failures["left"]:
            failures["left"] -= 1
            raise mlflow.exceptions.MlflowException("API request failed: connection reset")
        return real_log_batch(self, run_id, metrics, params, tags, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    run_dir = tmp_path / "d"
    seed_store(run_dir, empty_store)
    run(run_dir, dataset)
    assert "warning: MLflow logging failed" in capsys.readouterr().err and failures["left"] == 0
    saved = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    assert_metrics_equal(client, saved["run_id"], run_dir)
    top = {f.path for f in client.list_artifacts(saved["run_id"])}  # (no log.mlflow_checkpoints, no log.report)
    assert "summary.json" in top and "checkpoints" not in top and "report" not in top


def test_a_record_becomes_metrics_under_dotted_names_and_the_config_json_params() -> None:
    record = {"epoch": 2, "val_loss": 0.5, "loss_terms": {"ce": 0.4, "l2sp": 0.1}, "lr_groups": {"a+b": 1e-5},
              "note": "text", "flag": True}  # fmt: skip
    assert record_metrics(record) == {
        "epoch": 2.0, "val_loss": 0.5, "loss_terms.ce": 0.4, "loss_terms.l2sp": 0.1, "lr_groups.a_b": 1e-5, "flag": 1.0
    }  # fmt: skip
    params = config_params(load_config(None, ["train.lr=1e-05", "data.mean=[0.5, 0.5, 0.5]"]))
    assert params["train.lr"] == "1e-05" and params["data.mean"] == "[0.5, 0.5, 0.5]"
    assert params["run.output_dir"] == "null" and params["run.name"] == "tltool-run"
    assert load_config(None, [f"{k}={params[k]}" for k in ("train.lr", "data.mean")]).train.lr == 1e-05  # pastes back


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_mlflow_server_receives_the_run(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "server_artifacts")]  # fmt: skip
    server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env, start_new_session=True)
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start in 45 s"
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        run_dir = tmp_path / "e"
        summary = run(run_dir, dataset, "train.epochs=1")
        assert summary["mlflow"]["tracking_uri"] == uri
        assert not (tmp_path / "mlruns").exists()  # nothing went to a local store
        client = MlflowClient(tracking_uri=uri)
        run_id = summary["mlflow"]["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert_metrics_equal(client, run_id, run_dir)
        assert "summary.json" in {f.path for f in client.list_artifacts(run_id)}
        assert list((tmp_path / "server_artifacts").rglob("summary.json"))  # through the server's artifact proxy
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # (the server's own process group: it and its workers)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_under_torchrun_only_rank_0_logs(tmp_path: Path, dataset: Path, empty_store: Path) -> None:
    run_dir = tmp_path / "ddp"
    seed_store(run_dir, empty_store)
    overrides = run_overrides(run_dir, dataset, "log.mlflow=true", "train.epochs=1", "data.batch_size=4")
    config = write_config(tmp_path / "ddp.yaml", overrides)
    command = [sys.executable, "-m", "tltool", "finetune", str(config), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("mlflow: run ") == 1
    saved = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    experiment = client.get_experiment_by_name("tltool")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [saved["run_id"]]
    assert_metrics_equal(client, saved["run_id"], run_dir)  # one value per key: rank 1 sent nothing


def test_an_unreachable_or_hanging_tracking_server_is_one_line_before_training(
    cli, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "f", dataset, "log.mlflow=true"))
    # Nothing listens: refused at once.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot use the MLflow tracking store http://127.0.0.1")
    assert "MLFLOW_TRACKING_URI" in lines[0] and "log.mlflow=false" in lines[0]
    assert time.monotonic() - started < 10
    assert not (tmp_path / "f" / "metrics.jsonl").exists() and not (tmp_path / "f" / "checkpoints").exists()
    # A server that accepts the connection and never answers: cut after the probe's timeout, not mlflow's
    # minutes of retries.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        result = cli.invoke(app, ["finetune", str(config)])
        elapsed = time.monotonic() - started
    assert result.exit_code == 2 and result.output.startswith("error: cannot use the MLflow"), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert elapsed < 20, elapsed
    assert not (tmp_path / "f" / "metrics.jsonl").exists()
    # A folder: mlflow 3 refuses its legacy file store; the line says what to use instead.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    result = cli.invoke(app, ["finetune", str(config)])
    if result.exit_code != 0:  # (an mlflow that still takes file stores logs there; nothing to check)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert "file store" in result.output and "sqlite:///" in result.output, result.output


def test_without_mlflow_installed_the_run_is_one_line_naming_the_pip_command(
    cli, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "g", dataset, "log.mlflow=true"))
    for extra in ([], ["--dry-run"]):
        result = cli.invoke(app, ["finetune", str(config), *extra])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            "error: log.mlflow needs the mlflow package — pip install 'tltool[mlflow]' (or set log.mlflow=false)"
        )
    assert not (tmp_path / "g" / "metrics.jsonl").exists()


def test_a_run_directory_that_cannot_keep_the_mlflow_id_leaves_no_mlflow_run(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path
) -> None:
    """mlflow.json is what lets a resume find its MLflow run: when it cannot be written (a full disk), the run
    just created is deleted again instead of being left RUNNING with nothing that points at it."""
    import tltool.tracking as tracking
    from tltool.errors import TltoolError

    def full_disk(path, text):
        raise tracking.TrackingError("no space left on device", "free disk space")

    monkeypatch.setattr(tracking, "write_text_atomic", full_disk)
    run_dir = tmp_path / "d"
    seed_store(run_dir, empty_store)
    with pytest.raises(TltoolError, match="no space"):
        run(run_dir, dataset)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlruns' / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=3)  # (ALL: deleted too)
    assert runs and all(r.info.lifecycle_stage == "deleted" for r in runs)
