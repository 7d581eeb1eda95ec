"""`tltool serve`: the real server started as a subprocess on 127.0.0.1, asked over HTTP with httpx.

Its answers are compared with `tltool predict --json` on the same files (the model is conftest's shared resnet18
run on 32x32 PNGs); batching, bad and oversized uploads, a port in use and SIGTERM are checked on the running
process. Each server is started with --port 0 (it prints the port it got) and always stopped in a `finally`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import shared_dataset, trained_checkpoint
from tltool.cli import app
from tltool.serve import MicroBatcher
from tltool.trained import open_trained

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


@dataclass
class Server:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    url: str = ""


def _server_env() -> dict[str, str]:
    """This checkout first on the path (the venv may hold another), one torch thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _command(model: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tltool", "serve", str(model), *flags]


@contextmanager
def running_server(model: Path, *flags: str) -> Iterator[Server]:
    """`tltool serve MODEL --port 0 FLAGS` until it prints its URL; killed in the end whatever happened."""
    process = subprocess.Popen(
        _command(model, "--port", "0", *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_server_env(),
    )
    server = Server(process)
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            server.lines.append(line.rstrip("\n"))
            if line.startswith("serving ") and "http://" in line:
                server.url = line.split("http://", 1)[1].split()[0].rstrip("/")
                server.url = f"http://{server.url}"
                ready.set()
        ready.set()  # the process ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready.wait(START_TIMEOUT_S)
        assert server.url, f"the server did not start: {server.lines}"
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        reader.join(timeout=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_checkpoint("resnet18", tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[Server]:
    # A wait long enough that 8 concurrent clients land in one batch even on a loaded 2-core machine.
    with running_server(checkpoint, "--max-batch", "8", "--max-wait-ms", "30", "--max-upload-mb", "1") as started:
        yield started


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Any]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def predict_json(model: Path, files: list[Path], topk: int = 3) -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["predict", str(model), *map(str, files), "--json", "--topk", str(topk)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_same(got: list[dict[str, Any]], expected: list[dict[str, Any]], names: list[str]) -> None:
    """The same labels and indices in the same order, probabilities within 1e-6; `file` is the upload's name."""
    assert [entry["file"] for entry in got] == names
    assert len(got) == len(expected)
    for answer, reference in zip(got, expected, strict=True):
        assert [(p["label"], p["index"]) for p in answer["predictions"]] == [
            (p["label"], p["index"]) for p in reference["predictions"]
        ]
        for p, q in zip(answer["predictions"], reference["predictions"], strict=True):
            assert abs(p["probability"] - q["probability"]) <= 1e-6


def multipart(files: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (path.name, path.read_bytes(), "image/png")) for path in files]


class FakePredictor:
    """What MicroBatcher needs of a Predictor: a class list and `probabilities`; records each call's batch size."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.spec = SimpleNamespace(class_names=("a", "b"))
        self.kind, self.path = "checkpoint", Path("fake.pt")
        self.calls: list[int] = []
        self.fail_on = fail_on

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(pixels))
        if len(self.calls) == self.fail_on:
            raise RuntimeError("the model failed")
        means = pixels.float().mean(dim=(1, 2, 3))
        return torch.stack([means, -means], dim=1).softmax(dim=1)


def test_the_batcher_takes_up_to_max_batch_per_call_and_each_request_gets_its_row() -> None:
    predictor = FakePredictor()
    batcher = MicroBatcher(predictor, max_batch=8, max_wait_s=0.05)  # type: ignore[arg-type]
    images = [torch.full((3, 2, 2), i, dtype=torch.uint8) for i in range(20)]
    futures = [batcher.submit(image) for image in images]  # all waiting before the worker starts
    batcher.start()
    rows = [future.result(timeout=10) for future in futures]
    batcher.stop()
    assert predictor.calls == [8, 8, 4]  # one model call per batch, none above --max-batch
    assert batcher.stats() == {"batches": 3, "images": 20, "max_batch_seen": 8}
    for image, row in zip(images, rows, strict=True):
        assert torch.equal(row, predictor.probabilities(image[None])[0])  # its own row, not a neighbour's


def test_the_batcher_waits_at_most_max_wait_and_a_failed_call_fails_only_its_batch() -> None:
    predictor = FakePredictor(fail_on=1)
    batcher = MicroBatcher(predictor, max_batch=32, max_wait_s=0.2)  # type: ignore[arg-type]
    batcher.start()
    try:
        begun = time.monotonic()
        first = batcher.submit(torch.zeros(3, 2, 2, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match="the model failed"):
            first.result(timeout=10)
        waited = time.monotonic() - begun
        assert 0.15 <= waited < 5  # alone in the queue: run once --max-wait-ms has passed, not before
        second = batcher.submit(torch.ones(3, 2, 2, dtype=torch.uint8)).result(timeout=10)
        assert second.shape == (2,) and predictor.calls == [1, 1]
    finally:
        batcher.stop()


def test_health_and_metadata(client: Any, checkpoint: Path) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    meta = client.get("/metadata").json()
    trained = open_trained(checkpoint)
    assert meta["classes"] == list(trained.class_names)
    assert meta["format"] == "checkpoint"
    assert meta["preprocessing"] == json.loads(json.dumps(trained.preprocess.to_dict()))
    assert meta["temperature"] is None and meta["max_batch"] == 8 and meta["topk"] == 5


def test_answers_equal_tltool_predict_json(client: Any, checkpoint: Path, dataset: Path) -> None:
    files = sorted(dataset.rglob("*.png"))
    reference = predict_json(checkpoint, files)
    assert len({entry["predictions"][0]["label"] for entry in reference}) > 1  # the model tells images apart
    # One image as the raw body.
    one = client.post("/predict", content=files[0].read_bytes(), params={"topk": 3, "filename": files[0].name})
    assert one.status_code == 200, one.text
    assert_same(one.json(), reference[:1], [files[0].name])
    # Several as multipart files, in one request (answered in upload order).
    several = client.post("/predict", files=multipart(files), params={"topk": 3})
    assert several.status_code == 200, several.text
    assert_same(several.json(), reference, [path.name for path in files])
    # The server's default --topk 5 is cut to the 3 classes, as predict cuts it.
    assert len(client.post("/predict", content=files[0].read_bytes()).json()[0]["predictions"]) == 3


def test_concurrent_requests_succeed_and_share_model_calls(
    client: Any, server: Server, checkpoint: Path, dataset: Path
) -> None:
    files = sorted(dataset.rglob("*.png"))
    expected = predict_json(checkpoint, files, topk=5)
    before = client.get("/health").json()

    def ask(index: int) -> tuple[int, int, list[dict[str, Any]]]:
        path = files[index % len(files)]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = http.post("/predict", content=path.read_bytes(), params={"filename": str(index)})
        return index, response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(64)))
    assert [status for _, status, _ in answers] == [200] * 64
    for index, _, body in answers:
        assert_same(body, [expected[index % len(files)]], [str(index)])
    after = client.get("/health").json()
    assert after["images"] - before["images"] == 64
    assert after["max_batch_seen"] >= 2  # at least one model call served several requests
    assert after["batches"] - before["batches"] < 64
    assert after["max_batch_seen"] <= 8  # --max-batch


def test_broken_uploads_are_4xx_and_the_server_keeps_serving(client: Any, dataset: Path) -> None:
    good = sorted(dataset.rglob("*.png"))[0]
    data = good.read_bytes()
    cases = {
        "not an image": b"this is not an image",
        "cannot decode": data[: len(data) // 2],  # a truncated PNG
    }
    for reason, body in cases.items():
        response = client.post("/predict", content=body)
        assert response.status_code == 400, response.text
        assert reason in response.json()["error"]
        assert response.json()["files"][0]["error"].startswith(reason)
    empty = client.post("/predict", content=b"")
    assert empty.status_code == 400 and "no image" in empty.json()["error"]
    garbled = client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert garbled.status_code == 400 and "multipart" in garbled.json()["error"]
    # One bad file among good ones: predict's per-file `error`, the others answered.
    mixed = client.post("/predict", files=[*multipart([good]), ("files", ("notes.png", b"text", "image/png"))])
    assert mixed.status_code == 200
    assert mixed.json()[1] == {"file": "notes.png", "error": "not an image"}
    bad_topk = client.post("/predict", content=data, params={"topk": 0})
    assert bad_topk.status_code == 422 and bad_topk.json()["error"].startswith("bad query parameter (topk: ")
    assert client.post("/predict", content=data).status_code == 200


def test_an_oversized_upload_is_413(client: Any, dataset: Path) -> None:
    big = os.urandom(int(1.5 * 1024 * 1024))  # over --max-upload-mb 1
    response = client.post("/predict", content=big)
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    chunked = client.post("/predict", content=chunks())
    assert chunked.status_code == 413
    good = sorted(dataset.rglob("*.png"))[0]
    assert client.post("/predict", content=good.read_bytes()).status_code == 200


def test_a_port_in_use_is_one_line_and_exit_2(checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            _command(checkpoint, "--port", str(port)), capture_output=True, text=True, env=_server_env(), timeout=60
        )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is already in use — stop what serves there, or pick another --port"
    )


def test_an_onnx_export_serves_what_predict_gives_and_sigterm_stops_it_with_exit_0(
    checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    """Any export is served through predict's loader; /metadata shows its format and the calibrated T.
    Then SIGTERM: uvicorn's graceful shutdown, exit 0 within seconds (one server start for both: 2 cores)."""
    pytest.importorskip("onnxruntime")
    cli = CliRunner()
    calibrated = tmp_path / "calibrated.pt"
    result = cli.invoke(app, ["calibrate", str(checkpoint), "--data", str(dataset), "-o", str(calibrated)])
    assert result.exit_code == 0, result.output
    onnx = tmp_path / "model.onnx"
    result = cli.invoke(app, ["export", str(calibrated), "--format", "onnx", "-o", str(onnx), "--no-verify"])
    assert result.exit_code == 0, result.output
    files = sorted(dataset.rglob("*.png"))[::4]
    reference = predict_json(onnx, files)
    with running_server(onnx) as started, httpx.Client(base_url=started.url, timeout=30) as http:
        meta = http.get("/metadata").json()
        temperature = open_trained(calibrated).checkpoint.temperature
        assert meta["format"] == "onnx" and temperature is not None
        assert meta["temperature"] == pytest.approx(temperature)
        answers = http.post("/predict", files=multipart(files), params={"topk": 3})
        assert answers.status_code == 200, answers.text
        assert_same(answers.json(), reference, [path.name for path in files])
        # A request in flight when SIGTERM comes (headers and half its body sent) is still answered.
        host, port = started.url.removeprefix("http://").rsplit(":", 1)
        image = files[0].read_bytes()
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            head = f"POST /predict?topk=3 HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(image)}\r\n\r\n"
            conn.sendall(head.encode() + image[: len(image) // 2])
            time.sleep(0.5)
            started.process.send_signal(signal.SIGTERM)
            begun = time.monotonic()
            time.sleep(0.5)
            assert started.process.poll() is None  # waiting for the request
            conn.sendall(image[len(image) // 2 :])
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
        status, _, body = response.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200"), response
        assert_same(json.loads(body), reference[:1], ["upload"])
        assert started.process.wait(timeout=15) == 0
        assert time.monotonic() - begun < 10
    assert started.lines[-1] == "server stopped"
    assert not any("Traceback" in line for line in started.lines)


def test_bad_flags_and_a_missing_extra_are_one_line_errors(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = CliRunner()
    result = cli.invoke(app, ["serve", str(checkpoint), "--max-batch", "0", "--port", "70000"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("error: ") and "--max-batch 0" in line and "--port 70000" in line and "\n" not in line
    import tltool.serve

    monkeypatch.setitem(tltool.serve.SERVE_MODULES, "fastapi", ("fastapi_is_not_installed",))
    result = cli.invoke(app, ["serve", str(checkpoint)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: tltool serve needs fastapi, which is not installed — pip install 'tltool[serve]'"
    )
