"""The HTTP service: `create_app(model_path, settings)` builds a FastAPI app around one model.

Routes are thin: parse the request, hand the image to the `InferenceEngine`, format the answer. Every failure a
client can cause is a 4xx with a JSON body {"error": "one line"}, logged in one line; the next request is served
as if nothing happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import socket
import sys
import time
import unicodedata
import weakref
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..checkpoint import CheckpointError, file_state
from ..data.images import DEFAULT_MAX_PIXELS, DataError
from ..predict import AUTO_TTA, Predictor, check_working_size, load, max_working_pixels
from .codec import (RequestError, UploadBudget, class_summary, decode_image, png_bytes, printable_name, rle_classes,
                    upload_bytes, upload_header)
from .engine import REQUEST_TTA, EngineStoppedError, InferenceEngine, QueueFullError
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics

STATIC = Path(__file__).parent / "static"
# The page and its files are revalidated on each load (a 304 when unchanged, PageFiles): with Last-Modified alone a
# browser caches them for a while by its own rule, and after an upgrade could pair the new page with the old script.
REVALIDATE = {"Cache-Control": "no-cache"}


class PageFiles(StaticFiles):
    """The page and its script and style, served with REVALIDATE and answered 304 when unchanged (StaticFiles reads
    the conditional headers; a FileResponse alone answered the page in full every time). Under /static the page is
    sent to its own address: opened there, its relative URLs named /static/static/app.js and /static/classes."""

    def __init__(self, *args, page_here: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.page_here = page_here

    async def get_response(self, path: str, scope) -> Response:
        if path == "index.html" and not self.page_here:
            return RedirectResponse("../", status_code=308)
        return await super().get_response(path, scope)

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(REVALIDATE)
        return response


ROUTES = ("/", "/predict", "/healthz", "/readyz", "/classes", "/metrics", "/docs", "/openapi.json", "/favicon.ico")
DOCS_ASSETS = "/docs-assets"  # Swagger UI's script and style, served from the installed package, not a CDN
log = logging.getLogger("resunet.serve")
UVICORN_INVALID_REQUEST = "Invalid HTTP request received."
ANSWERED_UNPARSED = "resunet.answered_unparsed"  # scope key: the protocol answered this request (a body h11 refused)


@dataclass
class ServeSettings:
    max_batch: int = 8  # images per forward pass at most
    max_wait_ms: float = 5.0  # how long the first queued image waits for others to join its batch
    max_queue: int = 64  # images waiting at most; beyond, 503 with Retry-After
    max_bytes: int = 20_000_000  # request body limit (413 beyond)
    max_pixels: int = DEFAULT_MAX_PIXELS  # image size limit, checked from the header before decoding (413 beyond)
    # Pixels of the images being decoded, waiting or segmented, all requests together (503 beyond): each holds memory
    # from its decode on, and 64 MP fit in a 200 KB upload.
    max_pending_pixels: int = 4 * DEFAULT_MAX_PIXELS
    # Bytes of the uploads being received or decoded, all requests together (503 beyond): --max-bytes bounds one.
    max_pending_bytes: int = 500_000_000
    # default test-time augmentation: none | flip (a request may ask with ?tta=); auto: none, or what an end-to-end
    # ONNX graph was exported with
    tta: str = AUTO_TTA
    device: str = "auto"  # for .pt checkpoints
    precision: str = "auto"  # for .pt checkpoints
    threads: int | None = None  # CPU threads: onnxruntime's for .onnx, torch's for .pt (default: the cores)
    retry_after_s: int = 1  # what a 503 asks the client to wait
    body_timeout_s: float = 30.0  # an upload with no byte for this long gets 408 (a stalled client frees its slot)
    head_timeout_s: float = 30.0  # a connection that has not sent a whole request head in this long is closed
    # False: the app's start returns before the model is warmed up, so a server answers at once (/healthz 200,
    # /readyz 503 until warm); `resunet serve` does so. True: it returns warm (an app mounted in another's lifespan).
    warm_up_first: bool = True

    def __post_init__(self) -> None:
        if self.tta not in (AUTO_TTA, *REQUEST_TTA):  # "ms" was served as "none" without a word
            raise ValueError(f"tta {self.tta!r}: the service runs {' or '.join(REQUEST_TTA)} (auto: the model's own)")
        # What the CLI's flags check, from Python too: max_bytes=0 answered every upload 413, body_timeout_s=0 every
        # one 408, and max_batch="8" was a TypeError deep in the engine (a helper's audit, 2026-12-07).
        counts = ["max_batch", "max_queue", "max_bytes", "max_pixels", "max_pending_pixels", "max_pending_bytes"]
        for name in counts + ["threads"] * (self.threads is not None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} {value!r}: a whole number, at least 1")
        if isinstance(self.retry_after_s, bool) or not isinstance(self.retry_after_s, numbers.Integral) or (
                self.retry_after_s < 0):
            raise ValueError(f"retry_after_s {self.retry_after_s!r}: a whole number of seconds, at least 0")
        for name, unit in (("body_timeout_s", "seconds, over 0"), ("head_timeout_s", "seconds, over 0"),
                           ("max_wait_ms", "milliseconds, at least 0")):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or value < 0 or (value == 0 and name != "max_wait_ms")):
                raise ValueError(f"{name} {value!r}: a finite number of {unit}")


def model_description(path: Path, predictor: Predictor) -> dict:
    from ..fingerprint import sha256_file

    if path.suffix.lower() == ".onnx":
        kind = f"onnx {predictor.graph}" + (" int8" if predictor.quantized else "")
    else:
        kind = "checkpoint"
    return {"file": path.name, "kind": kind, "sha256": sha256_file(path), "bytes": path.stat().st_size}


class ErrorBody(BaseModel):
    """Every error the service answers: one line, naming the problem (and the file, when there is one)."""

    error: str


BINARY = {"schema": {"type": "string", "format": "binary"}}
# /predict reads its body itself (raw image or multipart, bounded and timed), so FastAPI cannot infer it: described
# here for /docs, whose "Try it out" then offers a file field.
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": BINARY, "application/octet-stream": BINARY}}}
PREDICT_ERRORS = {status: {"model": ErrorBody, "description": meaning} for status, meaning in {
    400: "not a readable image, an empty body, or a malformed multipart form",
    408: "the upload stalled (no byte for --body-timeout seconds), or fell behind 4 KiB a second past them",
    413: "the body is over --max-bytes, the image over --max-pixels (read from its header), or too long and thin "
         "to run at the working size (or, for an end-to-end ONNX file, past its logit bound)",
    415: "a content type that is neither an image, raw bytes nor a multipart form",
    422: "a query parameter out of its choices (tta: the model's, as /classes lists them)",
    500: "the model failed on this image (logged with its traceback); the service goes on",
    503: "the model is not ready yet, or the queue or the memory budgets are full: retry after Retry-After seconds",
}.items()}
# What /healthz and /readyz answer besides 200 (the schema listed 200 alone; probes rely on these 503s).
PROBE_ERRORS = {503: {"model": ErrorBody, "description": "/readyz: not warmed up yet (with Retry-After), or never "
                                                         "to be (warm-up failed); /healthz: only the latter"}}


def json_bytes(payload: object) -> bytes:
    """`payload` as JSONResponse renders it. For /predict's answers, called in the thread pool: an RLE answer for a
    large photo holds millions of run lengths, and serialising it on the event loop stalled every connection."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def path_label(scope: dict) -> str:
    """A request's path as /metrics counts it: a route, a static folder, or "other" (no label per random path). An app
    mounted under a prefix (`app.mount("/seg", ...)`) counts its routes without it: Starlette keeps the whole path in
    scope["path"], and every request was counted as "other"."""
    path, prefix = scope["path"], scope.get("root_path", "")
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return path if path in ROUTES else next((f for f in ("/static", DOCS_ASSETS) if path.startswith(f + "/")), "other")


class PixelBudget:
    """The pixels of the images being decoded, waiting or segmented, all requests together, at most `limit`: each
    takes memory from its decode on (about 10 bytes a pixel while decoding, 3 after), while its upload may be a
    few hundred KB. The queue counted images, and decoding happened before it: three 200 KB uploads of 8000×8000
    at once took the service from 1 to 4.9 GB (a helper, 2026-12-06). One image alone is always let in (its own
    limit is --max-pixels)."""

    def __init__(self, limit: int, metrics: ServiceMetrics) -> None:
        self.limit, self.pending = limit, 0
        metrics.pending_pixels.set_function(lambda: self.pending)

    @contextmanager
    def holding(self, pixels: int):
        """Count `pixels` while the block runs (on the event loop: no lock); QueueFullError if they do not fit."""
        if self.pending and self.pending + pixels > self.limit:
            raise QueueFullError(f"{self.pending:,} pixels of other images are being decoded or segmented "
                                 f"(--max-pending-pixels {self.limit:,})")
        self.pending += pixels
        try:
            yield
        finally:
            self.pending -= pixels


class LogAndCount:
    """Every HTTP request's one log line and its metrics, whatever became of it. A plain ASGI middleware: FastAPI's
    @app.middleware("http") hides the client's disconnect from the endpoint (its request.is_disconnected() stays
    False), and sees a bug as an exception raised past it, neither counted nor logged as a request."""

    def __init__(self, app, metrics: ServiceMetrics, on_bug) -> None:
        self.app, self.metrics, self.on_bug = app, metrics, on_bug

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        label = path_label(scope)  # now: a mount inside the app (the static files) rewrites the scope's root_path

        async def send_noting_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        request = Request(scope, receive)
        try:
            if any(unicodedata.category(c).startswith("C") for c in scope["path"]):
                # A control character in a path names no route, but Starlette's route patterns end in "$", which
                # also matches before a final line break: /predict%0A ran a prediction (a helper, 2026-12-06).
                raise StarletteHTTPException(404)
            await self.app(scope, receive, send_noting_status)
        except StarletteHTTPException as error:  # the path refused above (the app answers its own)
            request.state.error = f"{scope['method']} {printable_name(scope['path'])}: {error.detail}"
            if not status["sent"]:
                await error_response(error.status_code, request.state.error)(scope, receive, send_noting_status)
        except ClientDisconnect:  # the client went away: nobody to answer, nothing to fix here
            if scope.get(ANSWERED_UNPARSED):  # not the client: its body could not be parsed, answered, logged, counted
                return
            request.state.error = "client disconnected"
            status["code"] = 499  # nginx's "client closed request", for the log and the metrics
        except asyncio.CancelledError:  # at shutdown, uvicorn cancels what still runs when --drain-timeout passes
            request.state.error = ("the service stopped before the answer (--drain-timeout passed, or a second Ctrl-C "
                                   "cut the shutdown short)")
            if not status["sent"]:  # else uvicorn logged a traceback per request and sent a text/plain 500
                try:
                    await error_response(503, request.state.error)(scope, receive, send_noting_status)
                except Exception:  # the connection is closing too: the log line and the count remain
                    status["code"] = 503
        except Exception as error:  # a bug: answered here, where the log line and the metrics are
            response = await self.on_bug(request, error)
            if not status["sent"]:
                await response(scope, receive, send_noting_status)
        seconds = time.perf_counter() - started
        path = printable_name(scope["path"])  # decoded: a %0A would start a forged log line
        self.metrics.requests.labels(label, str(status["code"])).inc()
        self.metrics.latency.labels(label).observe(seconds)
        error = getattr(request.state, "error", None)
        log.info("%s %s %d %.1f ms%s", scope["method"], path, status["code"], 1000 * seconds,
                 f" error: {error}" if error else "")


async def until_done_or_gone(request: Request, work):
    """Await `work`, but cancel it if the client hangs up meanwhile: under overload the queue must not fill with
    images nobody waits for (the engine skips a job whose future is cancelled). One receive() waits for the hang-up,
    as Starlette's streaming responses do: polling request.is_disconnected() every 50 ms had uvicorn read the socket
    each time, and the next request a client pipelined behind this one piled up in memory, uncounted by any limit,
    at about 5 MiB/s (a helper, 2026-12-06)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnect()
    finally:  # also when this request is cancelled (--drain-timeout passed): a task left running ended in an error
        task.cancel()  # nobody retrieved, and asyncio logged its traceback (a helper, 2026-12-06)
        gone.cancel()


async def client_gone(receive) -> None:
    """Returns when the client has hung up (its body was read before: nothing else comes for this request)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(model_path: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving `model_path` (a .pt checkpoint or an exported .onnx file). The model is loaded here
    (a missing, corrupt or foreign file raises CheckpointError at once); it is warmed up when the app starts, and
    /readyz answers 503 until then."""
    settings = settings or ServeSettings()
    model_path = Path(model_path)
    metrics = ServiceMetrics()
    loaded = file_state(model_path) if model_path.is_file() else None  # a missing file: load's own error
    running = InferenceEngine(
        partial(load, model_path, device=settings.device, precision=settings.precision, tta=settings.tta,
                threads=settings.threads),
        metrics, settings.max_batch, settings.max_wait_ms, settings.max_queue)
    # FastAPI's caches keep every endpoint function for the process's life (lru_caches keyed by the function): the
    # closures below reach the engine, and through it the model, by a weak reference, else each app created kept its
    # model and inference thread (a notebook or a test suite making apps grew by the model's size each time). The
    # app holds the engine (app.state.engine).
    engine = weakref.proxy(running)
    predictor = running.predictor
    info = predictor.info
    pixels = PixelBudget(settings.max_pending_pixels, metrics)
    uploads = UploadBudget(settings.max_pending_bytes, settings.retry_after_s)
    metrics.pending_upload_bytes.set_function(lambda: uploads.pending)
    description = {
        "classes": [{"id": i, "name": name, "color": list(colour)}
                    for i, (name, colour) in enumerate(zip(info.names, info.palette))],
        "dataset": info.name,
        "ignore_index": info.ignore_index,
        "ignore_color": list(info.ignore_colour),
        "working_size": predictor.size,
        "limits": {"max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels},  # the page checks a file's size
        "tta": {"default": engine.default_tta, "available": list(engine.variants)},
        "model": model_description(model_path, predictor),
        "resunet_version": __version__,
    }
    if loaded is not None and file_state(model_path) != loaded:  # /classes would give another file's sha256
        running.executor.shutdown(wait=False)
        raise CheckpointError(f"{model_path}: replaced while the service loaded it (a deployment still writing it?); "
                              "start the service again once it is in place")

    def say_ready() -> None:
        log.info("ready: %s (%s), working size %d, classes %d", model_path.name, description["model"]["kind"],
                 description["working_size"], info.num_classes)

    def warm_up_failed(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("warm-up failed, the service stays unready (/readyz 503): %s", running.warm_up_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # no endpoint: none of FastAPI's caches keeps it
        await running.start(wait=settings.warm_up_first, on_ready=say_ready)
        running.starting.add_done_callback(warm_up_failed)
        yield
        await running.stop()

    # Swagger UI's files from fastapi_offline; its /docs page, ours: its endpoint closes over the app, which FastAPI's
    # caches then kept, with the model, for the process's life. ReDoc fetches its logo from a CDN: no /redoc.
    app = FastAPIOffline(title="resunet", version=__version__, lifespan=lifespan, static_url=DOCS_ASSETS,
                         docs_url=None, redoc_url=None,
                         description=f"Semantic segmentation with {model_path.name}: POST an image to /predict.")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{request.app.openapi_url}", title="resunet - Swagger UI",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png")

    app.state.engine, app.state.settings, app.state.description, app.state.metrics, app.state.uploads = (
        running, settings, description, metrics, uploads)

    app.add_middleware(LogAndCount, metrics=metrics, on_bug=lambda request, error: on_bug(request, error))

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, error: RequestError) -> JSONResponse:
        request.state.error = error.message
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # The scope's path as received (the URL's drops line breaks), control characters shown: it is logged
        message = f"{request.method} {printable_name(request.scope['path'])}: {error.detail}"
        request.state.error = message
        return error_response(error.status_code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}"
        request.state.error = message
        return error_response(422, message)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        message = f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        request.state.error = message
        log.exception("unexpected error on %s %s", request.method, printable_name(request.scope["path"]))
        return error_response(500, message)

    # GET and HEAD: uptime monitors and load balancers often probe with HEAD.
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(request: Request) -> Response:
        return await page_file.get_response("index.html", request.scope)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # every browser asks; no icon, and no 404 line in the log for it
        return Response(status_code=204)

    page_file = PageFiles(directory=STATIC, page_here=True)
    app.mount("/static", PageFiles(directory=STATIC), name="static")

    def unready() -> RequestError | None:
        """Why the model cannot answer now (503), or None."""
        if engine.warm_up_error:  # never to be ready
            return RequestError(503, f"model warm-up failed: {engine.warm_up_error}")
        if engine.starting is None:  # "not ready yet, retry in 1 s" told such a client to wait for ever
            return RequestError(503, "the model was never started: this app's lifespan has not run (httpx's "
                                "ASGITransport and a mounted app run none); serve it with uvicorn, use `with "
                                "TestClient(app)`, or give the outer app lifespan=app.router.lifespan_context")
        if not engine.ready:
            return RequestError(503, "model not ready yet", {"Retry-After": str(settings.retry_after_s)})
        return None

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", summary="The process is alive", responses=PROBE_ERRORS)
    async def healthz() -> JSONResponse:
        if engine.warm_up_error:  # alive but never to be ready: a liveness probe should restart it
            return await readyz()
        return JSONResponse({"status": "ok"})

    @app.head("/readyz", include_in_schema=False)
    @app.get("/readyz", summary="The model is loaded and warmed up (503 until then)", responses=PROBE_ERRORS)
    async def readyz() -> JSONResponse:
        if refusal := unready():
            return error_response(refusal.status, refusal.message, refusal.headers)
        return JSONResponse({"status": "ready"})

    @app.get("/classes", summary="Classes, colours, ignore label, working size, the model file and its sha256")
    async def classes() -> dict:
        return description

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,  # text, not the default JSON
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def check_runnable(height: int, width: int, name: str) -> None:
        """413 for an image the model cannot run: a thin strip of few pixels can still ask the network for gigabytes
        at the working size, and an end-to-end ONNX graph has its bound on logits."""
        try:
            engine.predictor.check_size(height, width)
            check_working_size(height, width, engine.predictor.size, max_working_pixels(engine.predictor.size))
        except DataError as error:
            raise RequestError(413, f"{name}: {error}") from None

    def busy(error: QueueFullError) -> RequestError:
        return RequestError(503, f"busy: {error}; retry later", {"Retry-After": str(settings.retry_after_s)})

    @app.post(
        "/predict",
        summary="Segment one image",
        description="The image as a multipart upload (form field `file`) or as the raw body. Answers the palette "
                    "PNG class map at the image's size, or with `format=json` the classes present with their share, "
                    "or with `format=rle` COCO run-length encodings (column-major) of each class present.",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}, **PREDICT_ERRORS},
        openapi_extra=PREDICT_BODY,
    )
    async def predict(request: Request, format: str = Query("png", pattern="^(png|json|rle)$"),
                      tta: str | None = Query(None, pattern="^(none|flip)$")) -> Response:
        started = time.perf_counter()
        if refusal := unready():
            raise refusal
        if tta is not None and tta not in engine.variants:
            raise RequestError(422, f"tta '{tta}' is not available for this model "
                                    f"(available: {', '.join(engine.variants)})")
        with uploads.holding() as held:
            data, name = await upload_bytes(request, settings.max_bytes, settings.body_timeout_s, held)
            received = time.perf_counter()
            # In a thread: a header may be a million tiny PNG chunks, walked in Python, and the loop serves everyone.
            header = await run_in_threadpool(upload_header, data, name, settings.max_pixels)
            check_runnable(header.height, header.width, name)  # from the header: a refusal costs no decode
            try:
                engine.check_room()  # before the decode: under overload a refusal must cost little
                with pixels.holding(header.width * header.height):
                    image = await run_in_threadpool(decode_image, data, name, settings.max_pixels)
                    data = None  # the upload is its pixels now: counted by `pixels`, not `uploads`
                    held.release()
                    check_runnable(*image.shape[:2], name)
                    decoded = time.perf_counter()
                    result = await until_done_or_gone(request, engine.submit(image, tta))
                    del image
            except QueueFullError as error:
                raise busy(error) from None
            except EngineStoppedError as error:
                raise RequestError(503, str(error), {"Retry-After": str(settings.retry_after_s)})
        inferred = time.perf_counter()
        if format == "png":
            body = await run_in_threadpool(lambda: png_bytes(engine.predictor.colorize(result.mask)))
        else:  # serialised here too: the bulk of an RLE answer (millions of run lengths) was outside `encode`
            summary = class_summary if format == "json" else rle_classes
            classes_json = await run_in_threadpool(lambda: json_bytes(summary(result.mask, info)))
        timing = {"receive": received - started, "decode": decoded - received, "queue": result.queue_ms / 1000,
                  "inference": result.inference_ms / 1000, "encode": time.perf_counter() - inferred}
        timing = {key: round(1000 * value, 2) for key, value in timing.items()}
        timing["total"] = round(1000 * (time.perf_counter() - started), 2)
        timing["batch_size"] = result.batch_size
        height, width = result.mask.shape
        if format == "png":
            headers = {"Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timing.items() if k != "batch_size"),
                       "X-Batch-Size": str(result.batch_size), "X-Image-Format": header.format,
                       "X-Image-Orientation": str(header.orientation)}
            return Response(body, media_type="image/png", headers=headers)
        # The mask is the upright image's: a client drawing it over the file as stored needs the turn.
        image_fields = {"format": header.format, "orientation": header.orientation}
        head = json_bytes({"width": width, "height": height, "image": image_fields})
        body = head[:-1] + b',"classes":' + classes_json + b',"timing_ms":' + json_bytes(timing) + b"}"
        return Response(body, media_type="application/json")

    return app


def over_the_limit_in_json(app, limit: int, connections: set, tasks: set, metrics: ServiceMetrics,
                           retry_after_s: int = 1):
    """`app`, except that past `limit` open connections (or requests in flight) a request gets 503 at once, in JSON
    with Retry-After, logged and counted like every other answer; the connection is then closed."""
    async def app_within_limit(scope, receive, send) -> None:
        # uvicorn's own test, made as a request's headers arrive; by now this request's task is counted: hence ">"
        if scope["type"] != "http" or (len(connections) < limit and len(tasks) <= limit):
            return await app(scope, receive, send)
        message = f"too many open connections (--max-connections {limit}); try again shortly"
        started = time.perf_counter()
        await error_response(503, message, {"Retry-After": str(retry_after_s), "Connection": "close"})(scope, receive,
                                                                                                      send)
        metrics.requests.labels(path_label(scope), "503").inc()
        metrics.latency.labels(path_label(scope)).observe(time.perf_counter() - started)  # its count = the requests
        log.info("%s %s 503 error: %s", scope["method"], printable_name(scope["path"]), message)

    return app_within_limit


def json_errors_protocol(metrics: ServiceMetrics, head_timeout_s: float = 30.0, retry_after_s: int = 1) -> type:
    """uvicorn's HTTP/1.1 protocol (h11), except for two answers uvicorn gives itself, before any app sees the
    request, in text/plain and without a reason: they are given like every other error, a JSON body naming the
    problem, one log line and a count in /metrics. A request it cannot parse (a garbage request line, a non-numeric
    Content-Length, headers past 16 KB) is counted under path "unparsed"; one past --max-connections under its
    path. And a connection must send a whole request head within `head_timeout_s` of opening (or of its last
    answer): uvicorn only times the idle wait after an answer, which any byte ends, so a client that never sent a
    byte, or sent its head a byte at a time, held its connection for ever; a thousand of them were
    --max-connections, and every other client got 503 (a helper, 2026-12-06). Closed then; answered 408 if part of a
    head had come."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            limit, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's check, made in JSON instead
            if limit is not None:
                self.app = over_the_limit_in_json(self.app, limit, self.connections, self.tasks, metrics,
                                                  retry_after_s)
            self.head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.await_head()

        def connection_lost(self, exc) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            super().connection_lost(exc)

        def await_head(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            self.head_deadline = self.loop.call_later(head_timeout_s, self.head_too_slow, self.cycle)

        def head_too_slow(self, cycle) -> None:
            # A head that came since is a new cycle (a pipelined one may have begun before the deadline was set: a
            # request under way is never cut here; its body has --body-timeout).
            if self.cycle is not cycle or (cycle is not None and not cycle.response_complete):
                return
            if self.transport.is_closing():
                return
            waiting = self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
            if waiting and self.conn.trailing_data[0]:  # part of a new head: said why
                message = f"the request head did not arrive within {head_timeout_s:g} s"
                body = json.dumps({"error": message}).encode()
                # Written as bytes: h11 sends no answer before a request head has come.
                self.transport.write(f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
                metrics.requests.labels("unparsed", "408").inc()
                log.info("- - 408 error: %s", message)
            self.transport.close()  # else idle, as after keep-alive, or the rest of a body answered early

        def send_400_response(self, msg: str) -> None:
            error = sys.exc_info()[1]  # uvicorn calls this inside its `except h11.RemoteProtocolError`
            if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                # Answered already, before its body was read (a 404, a 415), and the rest of that body is no HTTP:
                # nothing more can be said on this connection. h11 refused the 400, and asyncio logged "Fatal error:
                # protocol.data_received() call failed" with a traceback (a helper, 2026-12-06).
                self.transport.close()
                log.info("- - connection closed: the rest of an answered request's body is not HTTP (%s)", error)
                return
            status = error.error_status_hint if isinstance(error, h11.RemoteProtocolError) else 400
            message = f"invalid HTTP request: {error}" if error else msg
            body = json.dumps({"error": message}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()
            metrics.requests.labels("unparsed", str(status)).inc()
            log.info("- - %d error: %s", status, message)
            if self.cycle is not None:  # refused mid-body: the app, still reading, sees the close as a disconnect
                self.cycle.scope[ANSWERED_UNPARSED] = True

    return JsonErrorsH11Protocol


def bind_address(host: str, port: int) -> list[socket.socket]:
    """Bind the sockets `run_server` serves on: one per address `host` resolves to, as asyncio would (IPv6 sockets
    IPv6 only). Raises OSError (the address and why: a port in use, a host that does not resolve) before the model
    is warmed up and the service announced; uvicorn would say it later, in a log, with another exit status. For
    port 0 the system chooses a free port, and it stays bound from here on: nothing can take it between its
    announcement and the service's start."""
    bound = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)):
            try:
                listener = socket.socket(family, kind, proto)
            except OSError:  # a family this kernel lacks (IPv6 turned off, ::1 still in /etc/hosts): asyncio skips it
                continue
            bound.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no clash
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind((address[0], port, *address[2:]))
            # Listening at once: a socket bound but not listening does not keep another SO_REUSEADDR socket (any
            # server's) from binding and listening on the same port; uvicorn then failed to listen, after the URL
            # was announced. Connections wait in the backlog until the service accepts them.
            listener.listen(2048)
            port = port or listener.getsockname()[1]  # every address on the port the first one was given
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    if not bound:
        raise OSError(f"no address of {host} can be listened on here")
    return bound


def service_url(host: str, port: int) -> str:
    """The URL a browser opens: an IPv6 address in brackets (http://::1:8000/ is no URL)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def one_line_for_a_cut_shutdown(record: logging.LogRecord) -> bool:
    """A second Ctrl-C (or SIGTERM) during the shutdown makes uvicorn cancel the app's lifespan; starlette reports
    that as a failed shutdown carrying the CancelledError's traceback, which uvicorn logged whole: one line instead."""
    text = record.getMessage()
    if text.startswith("Traceback") and text.rstrip().endswith("CancelledError"):
        record.msg, record.args = "shutdown cut short by a second signal; requests still in flight were dropped", ()
    return True


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               drain_timeout_s: int = 30, max_connections: int | None = 1000,
               sockets: list[socket.socket] | None = None) -> None:
    """Serve `app` under uvicorn until SIGTERM / Ctrl-C: then stop accepting, finish what is in flight (for at most
    `drain_timeout_s` seconds: a client that stalls mid-upload must not hold the shutdown), return. Past
    `max_connections` open connections a request gets 503 at once: many idle clients cannot use up the process's
    file descriptors (then uvicorn's accept loop fails, logging a traceback for every try). It serves on `sockets`
    from bind_address(host, port), bound here if not given."""
    import signal
    import threading

    import uvicorn

    # Everything set here is put back on return (a second call logged every line twice, and the caller's own
    # handlers no longer saw resunet.serve); from a thread other than the main one no signal handler can be set
    # (uvicorn then sets none either), so none is.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s resunet serve: %(message)s", "%H:%M:%S"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(log_level.upper())
    log.propagate = False
    # After its graceful shutdown uvicorn raises the signal that stopped it again, under the handler it found at
    # start; with the default one SIGTERM would then kill the process (status -15). A no-op of ours lets it return.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if on_main_thread else None
    # Our protocol logs an unparsable request in one line with its reason; uvicorn's own warning would be a second.
    uvicorn_log = logging.getLogger("uvicorn.error")
    filters = (lambda record: record.getMessage() != UVICORN_INVALID_REQUEST, one_line_for_a_cut_shutdown)
    for one in filters:
        uvicorn_log.addFilter(one)
    try:
        if sockets is None:  # from Python: say where (uvicorn is silent about sockets given to it; port 0 is unknown)
            sockets = bind_address(host, port)
            log.info("serving on %s", service_url(host, sockets[0].getsockname()[1]))
        # An idle connection waits for its next request as long as for a first head (uvicorn's own 5 s closed it
        # first: a proxy keeping upstream connections open for a minute met closed ones)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_keep_alive=app.state.settings.head_timeout_s,
                                timeout_graceful_shutdown=drain_timeout_s, limit_concurrency=max_connections,
                                http=json_errors_protocol(app.state.metrics, app.state.settings.head_timeout_s,
                                                          app.state.settings.retry_after_s))
        uvicorn.Server(config).run(sockets=sockets)  # a failed start (a warm-up that raised): SystemExit(3)
    except KeyboardInterrupt:  # as uvicorn.run: a second Ctrl-C during the drain ends it quietly
        pass
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        for one in filters:
            uvicorn_log.removeFilter(one)
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
