"""FastAPI service: ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz`` and the web page at ``/``.

Safety rules this module keeps:

* admission comes first: a request is counted in (or refused with 503) before its body is read, so a
  refused upload never sits in memory; the body is then read with the upload limit (413 as soon as the
  stream passes it), into memory only (never a temp file), before any decoding;
* content is identified by decoding it with :func:`covidcxr.io.decode`, never by its file name:
  415 when it is no image format at all, 422 when it is one but cannot be decoded or used;
* decoding and preprocessing run in ``decode_workers`` threads; inference runs in micro-batches of up to
  ``max_batch`` images formed within ``max_wait_ms`` (:mod:`covidcxr.serve.batcher`), or, with
  ``max_batch=1``, one request at a time in ``max_concurrency`` slots;
* at most ``max_batch + queue`` requests (batched) or ``max_concurrency + queue`` (unbatched) are inside;
  beyond that, or after ``queue_timeout`` seconds of waiting, the answer is 503 with ``Retry-After``;
* an optional API key (``COVIDCXR_API_KEY``, ``--api-key-file`` or ``api_key=``) guards ``/v1/*`` and
  ``/openapi.json`` (401 without it; the Swagger page is then off);
* every error body is ``{"detail": "<one sentence>"}``, request validation (422) included;
* logs carry format, size, label and timing only: never image bytes, file names or DICOM tags;
* no CORS headers unless origins are configured.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import anyio
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

from covidcxr.io import CXRReadError, decode
from covidcxr.predict import (
    RESEARCH_NOTICE,
    Predictor,
    SeverityScorer,
    heat_rgba,
    strip_transient,
)
from covidcxr.predict.inputs import Item
from covidcxr.predict.pipeline import Pipeline
from covidcxr.preprocess import PresetError
from covidcxr.serve.batcher import BatcherFull, BatchTiming, MicroBatcher
from covidcxr.serve.config import ServeConfig
from covidcxr.serve.schemas import ErrorResponse, HealthResponse, Limits, ModelCard, ModelRef, PredictResponse

log = logging.getLogger("covidcxr.serve")
STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "COVIDCXR_API_KEY"
DISPLAY_SIZE = 512  # side of the image returned for the page (the model input, upscaled for the eye)
RETRY_AFTER_S = 2

_ERRORS = {
    400: {"model": ErrorResponse, "description": "The body is not a well-formed multipart form"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "Upload larger than the configured limit"},
    415: {"model": ErrorResponse, "description": "Content is not an image (checked by decoding, not by name)"},
    422: {"model": ErrorResponse, "description": "An image that cannot be decoded or used as a chest X-ray"},
    503: {"model": ErrorResponse, "description": "Inference queue full; retry after Retry-After seconds"},
}


class _Http(Exception):
    """Raised in the worker thread; turned into an HTTPException on the event loop."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


def _sniff(data: bytes) -> str:
    from covidcxr import io as cio

    return cio._sniff(data)  # the reader's own magic-byte check, so both agree on "not an image"


def _png_b64(arr: np.ndarray) -> str:
    import cv2

    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    elif arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


# --------------------------------------------------------------------------- the service object


class Service:
    """Decodes uploads and answers from the one prediction pipeline (:mod:`covidcxr.predict.pipeline`)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.predictor = pipeline.predictor
        self.severity = pipeline.severity
        self.gate = pipeline.gate  # is it a frontal CXR at all? (its state goes to /healthz)
        self.heatmapper = pipeline.heatmapper
        self.heatmap_note = None if pipeline.heatmapper is not None else f"no heatmap: {pipeline.heatmap_note}"

    def prepare(self, data: bytes, filename: str | None) -> "_Prepared":
        """Decode and preprocess one upload (a decode worker thread); _Http 415/422 when it cannot be used."""
        t0 = time.perf_counter()
        if not data:
            raise _Http(422, "the uploaded file is empty (0 bytes)")
        try:
            image, info = decode(data, filename or None)
        except CXRReadError as err:
            if _sniff(data) == "unknown":
                raise _Http(
                    415,
                    "the upload is not an image: expected PNG, JPEG, TIFF, BMP or DICOM content "
                    "(the content was checked, not the file name)",
                ) from None
            raise _Http(422, f"the upload could not be used: {err.reason}") from None
        try:
            tensor = self.predictor.preprocess(image)
        except PresetError as err:
            raise _Http(422, f"the image could not be preprocessed: {err}") from None
        return _Prepared(image=image, info=info, tensor=tensor, nbytes=len(data), t0=t0)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """N x C x H x W -> N x classes probabilities (the one model call; the batcher's inference thread)."""
        return self.predictor.probabilities(batch)

    def finish(self, prep: "_Prepared", probs: np.ndarray, want_heatmap: bool, want_image: bool,
               timing: BatchTiming | None = None) -> dict[str, Any]:
        """The response body for one prepared upload and its probabilities (severity, images, heatmap)."""
        p = self.predictor
        image, info, tensor, data_len = prep.image, prep.info, prep.tensor, prep.nbytes
        # the record of the one pipeline (gate, decision, prediction set, severity, map); this only renders it
        rec = self.pipeline.complete(Item("upload", tensor, image=image), probs, heatmap=want_heatmap)
        heat = rec.get("heat")
        strip_transient(rec)
        if rec.get("error"):  # a non-finite model output: never a label (the model's fault, not the upload's)
            log.error("predict failed: %s", rec["error"])
            raise _Http(500, f"internal error while predicting: {rec['error']}")
        rec.pop("path", None)
        rec["uncertain"] = rec.get("uncertain") or False
        if rec.get("prediction_set") is not None and rec["uncertain"]:
            from covidcxr.site.sets import UNCERTAIN_TEXT

            rec["referral"] = UNCERTAIN_TEXT  # a set of more than one class (or none) is shown as this

        out: dict[str, Any] = {
            **rec,
            "model": ModelRef(**rec["model"], arch=p.arch, backend=p.backend_name),
            "input": {"format": info.format, "width": int(info.width), "height": int(info.height), "bytes": data_len},
            "heatmap_png": None,
            "heatmap_note": None,
            "image_png": None,
            "batch_size": timing.batch_size if timing else 1,
            "queue_ms": timing.queue_ms if timing else None,
            "notice": RESEARCH_NOTICE,
        }
        if self.severity is None:
            out["severity_note"] = "no severity model is configured on this server"

        display = None
        if want_image or want_heatmap:
            side = max(p.preset.size, DISPLAY_SIZE)
            try:
                display = p.preset.with_size(side).prepare(image, p.masks())
            except PresetError:
                display = p.preset.denormalize(tensor)
        if want_image and display is not None:
            out["image_png"] = _png_b64((display * 255 + 0.5).astype(np.uint8))
        if want_heatmap:
            if self.heatmapper is None:
                out["heatmap_note"] = self.heatmap_note
            elif heat is None:  # the pipeline's map failed: the prediction stands, the note says why
                log.warning("heatmap failed: %s", str(rec.get("heatmap_error")).split(":")[0])
                out["heatmap_note"] = f"heatmap failed: {rec.get('heatmap_error')}"
            else:
                h, w = display.shape
                out["heatmap_png"] = _png_b64(heat_rgba(heat, (w, h)))
        out["elapsed_ms"] = round((time.perf_counter() - prep.t0) * 1000, 1)
        # Format, size and result only: no bytes, no file name, no DICOM tags.
        log.info(
            "predict %s %dx%d %d bytes -> %s (p_covid=%s) in %.0f ms (batch %d)",
            info.format, info.width, info.height, data_len, rec["label"],
            f"{rec['probabilities'].get('COVID-19', float('nan')):.3f}", out["elapsed_ms"], out["batch_size"],
        )
        return out

    def infer(self, data: bytes, filename: str | None, want_heatmap: bool, want_image: bool) -> dict[str, Any]:
        """One request end to end in the calling thread (the unbatched path, ``max_batch=1``)."""
        prep = self.prepare(data, filename)
        probs = self.predict_batch(prep.tensor[None])[0]
        return self.finish(prep, probs, want_heatmap, want_image)


@dataclass
class _Prepared:
    image: np.ndarray
    info: Any
    tensor: np.ndarray
    nbytes: int
    t0: float


class _Limiter:
    """Bounded concurrency plus a bounded waiting room; overflow becomes 503, not a hang."""

    def __init__(self, concurrency: int, queue: int, timeout: float):
        self.concurrency = max(1, int(concurrency))
        self.capacity = self.concurrency + max(0, int(queue))
        self.timeout = float(timeout)
        self.busy = 0
        self._limiter: anyio.CapacityLimiter | None = None

    def _busy_error(self, why: str) -> HTTPException:
        return HTTPException(
            503,
            detail=f"server busy: {why}; retry in {RETRY_AFTER_S} s",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Count the request in, or 503 at once when ``capacity`` requests are already inside."""
        if self.busy >= self.capacity:
            raise self._busy_error(f"{self.busy} requests running or waiting (limit {self.capacity})")
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    @asynccontextmanager
    async def worker(self) -> AsyncIterator[None]:
        """One of ``concurrency`` inference slots, for an admitted request (unbatched path); 503 on timeout."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        try:
            with anyio.fail_after(self.timeout):
                await self._limiter.acquire()
        except TimeoutError:
            raise self._busy_error(f"waited {self.timeout:.0f} s for a free worker") from None
        try:
            yield
        finally:
            self._limiter.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """:meth:`admit`, then :meth:`worker`."""
        async with self.admit(), self.worker():
            yield


async def read_upload(request: Request, limit_bytes: int, field: str = "file") -> tuple[bytes, str | None]:
    """The multipart ``field`` of an admitted request, streamed in and stopped at ``limit_bytes`` (413).

    Parts stay in memory (this parser's spool limit is above the upload limit, so an X-ray never lands in a
    temp file); no other request's parser is affected. 422 when the body is no multipart form with ``field``.
    """
    from starlette.datastructures import UploadFile as FormFile
    from python_multipart.exceptions import FormParserError
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(422, detail=f"invalid request: {field}: expected a multipart/form-data upload")
    seen = 0

    async def limited() -> AsyncIterator[bytes]:
        nonlocal seen
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit_bytes:  # stop reading: the rest of the body is never held
                raise HTTPException(413, detail=f"upload too large: the limit is {limit_bytes / 1e6:g} MB "
                                               "(covidcxr serve --max-upload-mb)")
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=16)
    parser.spool_max_size = limit_bytes + 1
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise HTTPException(422, detail=f"invalid request: {err.message}") from None
    except FormParserError as err:  # malformed multipart framing (schemathesis found these were a 500)
        raise HTTPException(400, detail=f"invalid request: the body is not a well-formed multipart form ({err})") from None
    try:
        item = form.get(field)
        if not isinstance(item, FormFile):
            raise HTTPException(422, detail=f"invalid request: {field}: Field required (a file upload)")
        return await item.read(), item.filename
    finally:
        await form.close()


class _UploadLimit:
    """ASGI middleware: 413 as soon as the body of ``/v1/predict`` is known to exceed the limit."""

    def __init__(self, app: Any, limit_bytes: int, paths: Sequence[str]):
        self.app = app
        self.limit = int(limit_bytes)
        self.paths = set(paths)

    def _detail(self, size: int | None) -> str:
        mb = self.limit / 1e6
        got = f" ({size / 1e6:.1f} MB)" if size else ""
        return f"upload too large{got}: the limit is {mb:g} MB (covidcxr serve --max-upload-mb)"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await JSONResponse({"detail": self._detail(int(length))}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # chunked upload without Content-Length
                    raise HTTPException(413, detail=self._detail(None))
            return msg

        await self.app(scope, limited, send)


class _SecurityHeaders:
    """nosniff everywhere; a strict CSP on the page (it needs nothing but itself and data: images)."""

    CSP = (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def add_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if page:
                    headers.append((b"content-security-policy", self.CSP.encode()))
                msg["headers"] = headers
            await send(msg)

        await self.app(scope, receive, add_headers)


# --------------------------------------------------------------------------- app factory


def read_api_key_file(path: str | os.PathLike) -> str:
    """The API key in a file (first line, whitespace stripped); ValueError naming the file when unusable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{p}: cannot read the API key file ({type(err).__name__}: {err.strerror or err})") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise ValueError(f"{p}: the API key file is empty")
    return key


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as the one-sentence ``detail`` every other error uses."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",)) or "request"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


def create_app(config: ServeConfig | str | os.PathLike | None = None, *, predictor: Predictor | None = None,
               **overrides: Any) -> FastAPI:
    """Build the app from a :class:`~covidcxr.serve.config.ServeConfig` (or a model path), for a checkpoint or
    ONNX file or a ready ``predictor``. Keyword ``overrides`` replace config fields (``create_app(path,
    api_key="", max_batch=1)`` as before); see ServeConfig for what each setting does.
    """
    c = ServeConfig.build(config, **overrides)
    if predictor is None:
        if c.model is None:
            raise ValueError("create_app needs a model path or a predictor")
        predictor = Predictor.from_path(c.model, backend=c.backend, threads=c.threads)
    if c.threads and predictor.backend_name == "torch":  # the ONNX backend must not import torch
        from covidcxr.predict.backend_torch import set_threads

        set_threads(c.threads)
    severity = SeverityScorer.from_path(c.severity) if c.severity else None
    from covidcxr.predict.pipeline import PipelineConfig

    config = PipelineConfig(model=str(predictor.path), backend=predictor.backend_name, threads=c.threads,
                            plausibility=c.plausibility, label_implausible=c.label_implausible,
                            severity=c.severity, always_severity=c.always_severity)
    service = Service(Pipeline(config, predictor=predictor, severity=severity, heatmapper=True))
    if c.api_key is not None:
        key = c.api_key
    elif c.api_key_file is not None:
        key = read_api_key_file(c.api_key_file)
    else:
        key = os.environ.get(API_KEY_ENV, "")
    batched = int(c.max_batch) > 1
    # late binding: the batch function is looked up per call (tests and wrappers may replace it)
    batcher = MicroBatcher(lambda x: service.predict_batch(x), c.max_batch, c.max_wait_ms) if batched else None
    limiter = _Limiter(int(c.max_batch) if batched else c.max_concurrency, c.queue, c.queue_timeout)
    decode_limiter: list[anyio.CapacityLimiter] = []  # made inside the event loop, on first use
    limits = Limits(
        max_upload_mb=c.max_upload_mb, max_concurrency=limiter.concurrency,
        queue=limiter.capacity - limiter.concurrency,
        queue_timeout_s=c.queue_timeout, max_batch=int(c.max_batch),
        max_wait_ms=float(c.max_wait_ms) if batched else None,
        decode_workers=int(c.decode_workers) if batched else None,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if batcher is not None:
            await batcher.aclose()

    app = FastAPI(
        title="covidcxr",
        version=predictor.version or "0",
        description=(
            "Chest X-ray COVID-19 screening model as a service. " + RESEARCH_NOTICE +
            " Upload one PNG, JPEG or DICOM file to POST /v1/predict as multipart field `file`."
        ),
        # the OpenAPI document follows the API's auth rule (served below); Swagger UI only without a key,
        # since the browser page cannot send the X-API-Key header when it loads the document
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.limiter = limiter
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"required when {API_KEY_ENV} is set")

    async def require_key(given: str | None = Depends(api_key_header)) -> None:
        if key and not (given and secrets.compare_digest(given.encode(), key.encode())):
            raise HTTPException(401, detail="missing or wrong API key (send it in the X-API-Key header)",
                                headers={"WWW-Authenticate": "APIKey"})

    # the schema declares the key (and 401) only when there is one: it must tell the truth (schemathesis)
    auth = [Depends(require_key)] if key else []
    auth_errors = {401: _ERRORS[401]} if key else {}

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    if not key:
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/docs", include_in_schema=False)
        async def docs() -> Any:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="covidcxr API")

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz() -> HealthResponse:
        """Liveness and load; never needs the API key."""
        gate = service.pipeline.gate.status()
        return HealthResponse(
            status="degraded" if gate["state"] == "down" else "ok", model=predictor.name,
            version=predictor.version, auth_required=bool(key), busy=limiter.busy, capacity=limiter.capacity,
            plausibility=gate,
        )

    @app.get("/v1/model", response_model=ModelCard, tags=["model"],
             responses=auth_errors, dependencies=auth)
    async def model_card() -> ModelCard:
        """The model card: architecture, classes, preset, threshold, training summary and metrics."""
        return ModelCard(
            **predictor.model_card(),
            heatmap_available=service.heatmapper is not None,
            heatmap_note=service.heatmap_note,
            severity=severity.info() if severity else None,
            always_severity=c.always_severity,
            limits=limits,
        )

    async def _batched(data: bytes, filename: str | None, heatmap: bool, image: bool) -> dict[str, Any]:
        if not decode_limiter:
            decode_limiter.append(anyio.CapacityLimiter(max(1, int(c.decode_workers))))
        prep = await anyio.to_thread.run_sync(service.prepare, data, filename, limiter=decode_limiter[0])
        try:
            with anyio.fail_after(c.queue_timeout):
                row, timing = await batcher.submit(prep.tensor)
        except TimeoutError:
            raise limiter._busy_error(f"waited {c.queue_timeout:.0f} s for a batch") from None
        except BatcherFull as err:
            raise limiter._busy_error(str(err)) from None
        return await anyio.to_thread.run_sync(service.finish, prep, row, heatmap, image, timing,
                                              limiter=decode_limiter[0])

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        tags=["model"],
        responses={k: v for k, v in _ERRORS.items() if k != 401 or key},
        dependencies=auth,
        # the body is read by hand after admission (read_upload), so the schema is declared here
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "properties": {"file": {
                "type": "string", "format": "binary", "minLength": 1,
                "description": "One PNG, JPEG, TIFF or DICOM file (not empty; content checked by decoding)"}}}}}}},
    )
    async def predict(
        request: Request,
        heatmap: bool = Query(False, description="add a Grad-CAM heatmap as base64 PNG"),
        image: bool = Query(False, description="add the model's view of the image as base64 PNG"),
    ) -> PredictResponse:
        """Predict one chest X-ray. Research use only."""
        async with limiter.admit():  # count in (or 503) before a byte of the body is read
            if batched and not batcher.has_room():  # a client retrying at once then costs no read, no decode
                raise limiter._busy_error(f"{batcher.not_started} requests already wait for the next batch")
            data, filename = await read_upload(request, int(limits.max_upload_mb * 1e6))
            try:
                if batched:
                    out = await _batched(data, filename, heatmap, image)
                else:
                    async with limiter.worker():
                        out = await anyio.to_thread.run_sync(service.infer, data, filename, heatmap, image)
            except _Http as err:
                log.info("predict rejected with %d", err.status)
                raise HTTPException(err.status, detail=err.detail) from None
            except HTTPException:
                raise
            except Exception as err:  # never crash the server; never echo internals to the client
                log.error("predict failed: %s", type(err).__name__, exc_info=True)
                raise HTTPException(500, detail="internal error while predicting; see the server log") from None
        return PredictResponse(**out)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    if c.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(c.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
        )
    app.add_middleware(_UploadLimit, limit_bytes=int(c.max_upload_mb * 1e6), paths=["/v1/predict"])
    app.add_middleware(_SecurityHeaders)
    log.info("serving %s (%s, %s backend); %s; auth %s; CORS %s", predictor.name, predictor.arch,
             predictor.backend_name,
             f"batches of <= {c.max_batch} within {c.max_wait_ms:g} ms" if batched else f"{c.max_concurrency} slots",
             "on" if key else "off", ",".join(c.cors_origins) if c.cors_origins else "closed")
    return app
