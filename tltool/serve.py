"""`tltool serve`: a prediction server over HTTP (FastAPI + uvicorn, the optional `serve` extra).

The model is opened by `predict.open_model` and every image goes through predict's own functions
(`pixels_of`, `batch_probabilities`, `top_predictions`, `ImageResult.to_dict`), so an answer of
`POST /predict` is the entry `tltool predict --json` prints for the same file, by construction.

Requests are decoded in uvicorn's thread pool, then each image waits in one queue. A single worker thread
(`MicroBatcher`) takes the first waiting image, then whatever else arrives within `--max-wait-ms`, up to
`--max-batch` images, and runs them through the model in one call: concurrent requests share forward passes.
`/health` counts the batches and the largest one seen.

The listening socket is bound here before the model is loaded (a port in use is one line at once, and there is
no window between a check and uvicorn's bind); uvicorn serves on it and owns the graceful shutdown (SIGTERM or
Ctrl-C: stop accepting, finish the requests in flight, then the lifespan's end stops the worker).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, Query), which are
# local names of build_app (fastapi is imported only once the extra is known to be installed).
import asyncio
import concurrent.futures
import contextlib
import errno
import importlib.util
import io
import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tltool import __version__
from tltool.errors import ConfigError

if TYPE_CHECKING:  # torch, PIL and predict are imported once the port is bound: a port in use fails in a moment
    import torch

    from tltool.predict import Predictor

INSTALL = "pip install 'tltool[serve]'"
# The import names of the serve extra's packages (python-multipart: `python_multipart`, `multipart` before 0.0.13).
SERVE_MODULES = {
    "fastapi": ("fastapi",),
    "uvicorn": ("uvicorn",),
    "python-multipart": ("python_multipart", "multipart"),
}
MAX_FILES = 256  # images in one multipart request
RAW_NAME = "upload"  # the `file` of a raw-body image unless ?filename= names it
SHUTDOWN_GRACE_S = 10  # in-flight requests get this long after SIGTERM


@dataclass(frozen=True)
class ServeSettings:
    """The flags of `tltool serve`."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    topk: int = 5

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def check(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port} is not a port number (0-65535; 0 picks a free one)")
        if self.max_batch < 1:
            problems.append(f"--max-batch {self.max_batch} must be at least 1")
        if self.max_wait_ms < 0:
            problems.append(f"--max-wait-ms {self.max_wait_ms:g} must be 0 or more")
        if self.max_upload_mb <= 0:
            problems.append(f"--max-upload-mb {self.max_upload_mb:g} must be more than 0")
        if self.topk < 1:
            problems.append(f"--topk {self.topk} must be at least 1")
        if problems:
            raise ConfigError("; ".join(problems), "e.g. --port 8000 --max-batch 32 --max-wait-ms 5 --topk 5")


# --- micro-batching ------------------------------------------------------------------------------------


@dataclass
class _Item:
    pixels: "torch.Tensor"
    future: "concurrent.futures.Future[torch.Tensor]" = field(default_factory=concurrent.futures.Future)


class MicroBatcher:
    """One worker thread that runs queued images through the model, several per call.

    It blocks for the first image, then takes more until `max_batch` are in hand or `max_wait_s` has passed
    since the first; one `batch_probabilities` call for all of them; each image's future gets its row. A
    failed call fails the futures of that batch only.
    """

    def __init__(self, predictor: "Predictor", max_batch: int, max_wait_s: float) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="tltool-batcher", daemon=True)
        self._lock = threading.Lock()
        self.batches = 0
        self.images = 0
        self.largest = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the worker."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=SHUTDOWN_GRACE_S)

    def submit(self, pixels: "torch.Tensor") -> "concurrent.futures.Future[torch.Tensor]":
        item = _Item(pixels)
        self._queue.put(item)
        return item.future

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"batches": self.batches, "images": self.images, "max_batch_seen": self.largest}

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        from tltool.predict import batch_probabilities

        try:
            probabilities = batch_probabilities(self.predictor, [item.pixels for item in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the requests waiting on this batch
            for item in batch:
                item.future.set_exception(exc)
            return
        with self._lock:
            self.batches += 1
            self.images += len(batch)
            self.largest = max(self.largest, len(batch))
        for item, row in zip(batch, probabilities, strict=True):
            item.future.set_result(row)


# --- requests ------------------------------------------------------------------------------------------


class RequestProblem(Exception):
    """A bad request: its HTTP status and the JSON body that says what is wrong and what to do."""

    def __init__(self, status: int, error: str, fix: str = "", **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"error": error, **({"fix": fix} if fix else {}), **extra}


def upload_problem(data: bytes, exc: BaseException) -> str:
    """Why an uploaded file cannot be read, in predict's words for a file."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning) or "too many pixels" in str(exc):
        return "too many pixels (decompression bomb)"
    return f"cannot decode ({exc})"


def decode_uploads(uploads: Sequence[tuple[str, bytes]], transform: Any) -> list[tuple[str, Any]]:
    """(name, pixels) for each upload that decodes, (name, why not) for each that does not."""
    from tltool.predict import DECODE_ERRORS, pixels_of

    decoded: list[tuple[str, Any]] = []
    for name, data in uploads:
        try:
            decoded.append((name, pixels_of(io.BytesIO(data), transform)))
        except DECODE_ERRORS as exc:
            decoded.append((name, upload_problem(data, exc)))
    return decoded


def metadata(predictor: "Predictor", settings: ServeSettings) -> dict[str, Any]:
    """`GET /metadata`: what the model is, how images are fed to it, and how the server batches."""
    spec = predictor.spec
    return {
        "model": str(predictor.path),
        "format": predictor.kind,
        "device": predictor.device,
        "backbone": spec.backbone,
        "classes": list(spec.class_names),
        "preprocessing": spec.preprocess.to_dict(),
        "temperature": spec.temperature,
        "topk": settings.topk,
        "max_batch": settings.max_batch,
        "max_wait_ms": settings.max_wait_ms,
        "max_upload_mb": settings.max_upload_mb,
        "tltool_version": __version__,
    }


def build_app(predictor: "Predictor", batcher: MicroBatcher, settings: ServeSettings) -> Any:
    """The FastAPI application: /predict, /health, /metadata; the lifespan starts and stops the batcher."""
    import torch
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    from tltool.data import IMAGE_EXTENSIONS
    from tltool.export.spec import uint8_transform
    from tltool.predict import ImageResult, label_thresholds, top_predictions

    # python-multipart logs each malformed body it meets; the client gets the 400, the console stays quiet.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    transform = uint8_transform(predictor.spec.preprocess)
    names = predictor.spec.class_names
    thresholds = label_thresholds(predictor.spec)  # a multilabel model: every label past its threshold
    limit = settings.max_upload_bytes
    too_large = f"the request is larger than --max-upload-mb {settings.max_upload_mb:g}"
    unreadable_fix = f"send images Pillow decodes ({' '.join(IMAGE_EXTENSIONS)})"
    too_large_fix = "send smaller images or fewer per request, or start the server with a larger --max-upload-mb"

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="tltool serve", version=__version__, lifespan=lifespan)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestProblem(413, too_large, too_large_fix)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body with no Content-Length
                raise RequestProblem(413, too_large, too_large_fix)
            chunks.append(chunk)
        return b"".join(chunks)

    async def uploads_of(request: Request, body: bytes, filename: str) -> list[tuple[str, bytes]]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return [(filename, body)]  # the body is the image

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=MAX_FILES, max_fields=MAX_FILES)
        except HTTPException as exc:  # starlette's answer to a malformed multipart body
            raise RequestProblem(400, f"malformed multipart body ({exc.detail})", "send files as form-data") from None
        try:
            files = [
                (value.filename or key, await value.read())
                for key, value in form.multi_items()
                if isinstance(value, UploadFile)
            ]
        finally:
            await form.close()
        if not files:
            raise RequestProblem(
                400, "the multipart request holds no file", "send images as files, e.g. curl -F file=@a.jpg"
            )
        return files

    @app.exception_handler(RequestProblem)
    async def _problem(_: Request, exc: RequestProblem) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{error['loc'][-1]}: {error['msg']}" for error in exc.errors())
        return JSONResponse({"error": f"bad query parameter ({problems})", "fix": "e.g. ?topk=3"}, status_code=422)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and how the micro-batching went: batches run, images in them, the largest batch."""
        return {"status": "ok", **batcher.stats()}

    @app.get("/metadata")
    async def get_metadata() -> dict[str, Any]:
        """Classes, preprocessing, model format, temperature (None unless calibrated), the server's limits."""
        return metadata(predictor, settings)

    @app.post("/predict")
    async def predict(
        request: Request,
        topk: int = Query(settings.topk, ge=1, description="labels per image"),
        filename: str = Query(RAW_NAME, description="the `file` of a raw-body image in the answer"),
    ) -> JSONResponse:
        """One image as the raw body, or several as multipart files: the list `tltool predict --json` prints."""
        body = await read_body(request)
        uploads = await uploads_of(request, body, filename)
        if len(uploads) == 1 and not uploads[0][1]:
            raise RequestProblem(400, "the request holds no image (empty upload)", "send the image's bytes")
        decoded = await run_in_threadpool(decode_uploads, uploads, transform)
        waiting = {i: batcher.submit(value) for i, (_, value) in enumerate(decoded) if isinstance(value, torch.Tensor)}
        rows = await asyncio.gather(*(asyncio.wrap_future(future) for future in waiting.values()))
        chosen = top_predictions(names, torch.stack(rows), topk, thresholds) if rows else []
        answers = dict(zip(waiting, chosen, strict=True))
        results = [
            ImageResult(name, answers[i], multilabel=thresholds is not None)
            if i in answers
            else ImageResult(name, error=str(value))
            for i, (name, value) in enumerate(decoded)
        ]
        if not answers:
            reasons = "; ".join(f"{r.file}: {r.error}" for r in results)
            raise RequestProblem(
                400,
                f"none of the {len(results)} uploaded image(s) could be read ({reasons})",
                unreadable_fix,
                files=[r.to_dict() for r in results],
            )
        return JSONResponse([r.to_dict() for r in results])

    return app


# --- the command ---------------------------------------------------------------------------------------


def missing_packages() -> list[str]:
    """The serve extra's packages that cannot be imported."""
    return [
        package
        for package, modules in SERVE_MODULES.items()
        if not any(importlib.util.find_spec(module) is not None for module in modules)
    ]


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a one-line ConfigError (port in use, host unknown, no permission)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host} cannot be resolved ({exc.strerror})", "e.g. --host 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses TIME_WAIT ports
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use", "stop what serves there, or pick another --port"
            ) from None
        if exc.errno == errno.EACCES:
            fix = "use a port above 1023, or run with the needed privileges"
            raise ConfigError(f"no permission to listen on {host}:{port}", fix) from None
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})", "check --host and --port") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def quiet_stop() -> Iterator[None]:
    """SIGTERM and SIGINT end `serve` with exit 0 once uvicorn has shut down.

    uvicorn catches them while it runs, shuts down gracefully, then raises the signal again under the handler
    it found; that handler is this no-op (restored afterwards), so a requested stop is not a crash.
    """
    handled = (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_serve(model: str, settings: ServeSettings, device: str = "auto", echo: Callable[[str], None] = print) -> None:
    """`tltool serve MODEL`: open the model, bind, serve until SIGTERM/Ctrl-C."""
    settings.check()
    missing = missing_packages()
    if missing:
        raise ConfigError(f"tltool serve needs {', '.join(missing)}, which is not installed", INSTALL)
    import uvicorn

    sock = listen(settings.host, settings.port)  # before torch and the model: a port in use fails in a moment
    try:
        import torch

        from tltool.device import resolve_device
        from tltool.predict import batch_probabilities, open_model

        predictor = open_model(model, resolve_device(device, "--device"), echo)
        # One call before serving: warms the model up and checks its outputs against the class list (one line).
        side = predictor.spec.preprocess.image_size
        batch_probabilities(predictor, [torch.zeros(3, side, side, dtype=torch.uint8)])
        batcher = MicroBatcher(predictor, settings.max_batch, settings.max_wait_ms / 1000)
        app = build_app(predictor, batcher, settings)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, lifespan="on"
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        echo(
            f"serving {predictor.path} ({predictor.kind} on {predictor.device}, {len(predictor.spec.class_names)} "
            f"classes) on http://{shown}:{port} — POST /predict, GET /health, GET /metadata; "
            "Ctrl-C or SIGTERM stops"
        )
        with quiet_stop():
            uvicorn.Server(config).run(sockets=[sock])
        echo("server stopped")
    finally:
        sock.close()
