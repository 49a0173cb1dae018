"""The HTTP side of ``qvggt-export serve``: a Starlette application speaking the KServe v2 / Triton protocol.

Endpoints (KServe v2 "required API", as Triton serves it):

* ``GET /v2``: server metadata; ``GET /v2/health/live``, ``GET /v2/health/ready``;
* ``GET /v2/models/{name}[/versions/{v}]``: model metadata (inputs, outputs, platform, frame range);
* ``GET /v2/models/{name}[/versions/{v}]/ready``;
* ``POST /v2/models/{name}[/versions/{v}]/infer``: JSON tensors, or Triton's binary tensor extension.

Errors are ``{"error": "<what is wrong>"}`` with a 4xx status (Triton's form): 400 malformed or invalid request,
404 unknown model or version, 413 body over ``max_body_bytes``, 503 when ``max_concurrency`` requests are running
and ``max_queue`` more are waiting (the server sheds load instead of queueing without bound). Parsing, inference
and encoding run in worker threads, so health checks answer while a request computes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qvggt_export import __version__
from qvggt_export.errors import QVGGTError
from qvggt_export.serve.backends import InferenceBackend
from qvggt_export.serve.protocol import HEADER_LENGTH, ProtocolError, encode_infer_response, parse_infer_request

__all__ = ["AppLimits", "create_app"]

logger = logging.getLogger(__name__)

MODEL_VERSION = "1"


@dataclass(frozen=True)
class AppLimits:
    """Admission limits of the server (validated by :class:`~qvggt_export.serve.config.ServeConfig`).

    Attributes:
        max_concurrency: Requests computed at once (worker threads running the backend).
        max_queue: Requests admitted beyond those, waiting for a worker; one more gets 503.
        max_body_bytes: Largest request body accepted; a larger one gets 413.
    """

    max_concurrency: int = 1
    max_queue: int = 16
    max_body_bytes: int = 256 << 20


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Admission:
    """Counts the requests inside the infer handler; all calls happen on the event loop, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def enter(self) -> Any:
        if self.active >= self.limit:
            raise ProtocolError(f"server busy: {self.active} requests running or queued (limit {self.limit}); "
                                "retry later", status=503)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"request body of {int(declared)} bytes exceeds the server's limit of {limit} bytes "
                            "(send fewer frames, use the binary tensor extension, or raise --max-body-mb)", status=413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"request body exceeds the server's limit of {limit} bytes", status=413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ProtocolError("the client closed the connection before sending the whole body (truncated body)"
                            ) from None
    return b"".join(chunks)


def create_app(backend: InferenceBackend, model_name: str = "vggt", limits: AppLimits | None = None,
               close_backend: bool = True) -> Starlette:
    """The ASGI application serving ``backend`` as model ``model_name`` (version 1).

    Args:
        backend: What runs the requests (:func:`~qvggt_export.serve.backends.open_backend`).
        model_name: The model's name in the URLs.
        limits: Admission limits.
        close_backend: Close the backend when the application shuts down.
    """
    limits = limits or AppLimits()
    signature = backend.signature
    admission = _Admission(limits.max_concurrency + limits.max_queue)
    workers = anyio.CapacityLimiter(limits.max_concurrency)
    state = {"ready": True}

    def check_model(request: Request) -> None:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != model_name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {model_name!r}", status=404)
        if version is not None and version != MODEL_VERSION:
            raise ProtocolError(f"model {name!r} has no version {version!r}; it has version {MODEL_VERSION}",
                                status=404)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "qvggt-export", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if state["ready"] else 503)

    async def model_metadata(request: Request) -> Response:
        try:
            check_model(request)
        except ProtocolError as exc:
            return _error(str(exc), exc.status)
        low, high = signature.frames
        return JSONResponse({
            "name": model_name, "versions": [MODEL_VERSION], "platform": backend.platform,
            "inputs": [signature.input.to_dict()], "outputs": [o.to_dict() for o in signature.outputs],
            "parameters": {"frames_min": low, "frames_max": high, "source": backend.source.name,
                           "input_range": "[0, 1], RGB, preprocessed as the export (qvggt_export.model.preprocess)"},
        })

    async def model_ready(request: Request) -> Response:
        try:
            check_model(request)
        except ProtocolError as exc:
            return _error(str(exc), exc.status)
        return Response(status_code=200 if state["ready"] else 503)

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        try:
            check_model(request)
            encoding = request.headers.get("content-encoding", "identity")
            if encoding != "identity":
                raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed",
                                    status=415)
            with admission.enter():
                body = await _read_body(request, limits.max_body_bytes)
                parsed = await anyio.to_thread.run_sync(
                    parse_infer_request, body, request.headers.get(HEADER_LENGTH), signature)
                del body
                results = await anyio.to_thread.run_sync(backend.infer, parsed.images, limiter=workers)
                payload, headers = await anyio.to_thread.run_sync(
                    encode_infer_response, model_name, MODEL_VERSION, parsed, results)
        except ProtocolError as exc:
            logger.info("infer refused (%d): %s", exc.status, exc)
            return _error(str(exc), exc.status)
        except QVGGTError as exc:  # the backend refused or failed (e.g. an engine error): say so, keep serving
            logger.error("inference failed: %s", exc)
            return _error(f"inference failed: {exc}", 500)
        logger.debug("infer %s: %d frames in %.1f ms", parsed.id or "-", parsed.images.shape[1],
                     1e3 * (time.perf_counter() - started))
        return Response(payload, status_code=200, headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # The server has stopped accepting and finished (or timed out) its in-flight requests.
        state["ready"] = False
        if close_backend:
            backend.close()
        logger.info("model %s closed", model_name)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready)]
    for prefix in (model, versioned):
        routes += [Route(prefix, model_metadata), Route(prefix + "/ready", model_ready),
                   Route(prefix + "/infer", infer, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)
