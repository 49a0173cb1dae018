"""``qvggt-export serve``: the configuration and the uvicorn server around :func:`~qvggt_export.serve.app.create_app`.

Graceful shutdown is uvicorn's: on SIGINT / SIGTERM it stops accepting connections, lets the requests in flight
finish (up to ``shutdown_timeout_s``), then the application closes the backend (engine, session).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.serve.backends import RUNTIMES, open_backend

__all__ = ["ServeConfig", "build_server", "serve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and how.

    Attributes:
        source: An export folder, an ``.onnx`` graph or an ``.engine`` file.
        runtime: ``auto``, ``tensorrt`` (GPU), ``onnxruntime`` or ``pytorch`` (see
            :func:`~qvggt_export.serve.backends.open_backend`).
        host: Address to listen on (``127.0.0.1``: this machine only; ``0.0.0.0`` in a container).
        port: TCP port (0: any free port).
        model_name: The model's name in the URLs (``/v2/models/<model_name>/infer``).
        max_frames: Frames per request, at most (an engine: at most its profile's maximum; others: default 32).
        max_concurrency: Requests computed at once.
        max_queue: Requests admitted beyond those; one more is answered 503.
        max_body_mb: Largest request body in MiB (413 above it).
        device: ``cuda:N`` for engines, ``cpu`` / ``cuda:N`` for pytorch.
        threads: ONNX Runtime intra-op threads per request (0: its default).
        ort_exact: ONNX Runtime with the parity checker's settings (no integer-kernel fusions), not the fastest form.
        shutdown_timeout_s: How long a shutdown waits for requests in flight.
    """

    source: Path
    runtime: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "vggt"
    max_frames: int | None = None
    max_concurrency: int = 1
    max_queue: int = 16
    max_body_mb: float = 256.0
    device: str | None = None
    threads: int = 0
    ort_exact: bool = False
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        if self.runtime not in RUNTIMES:
            raise QVGGTError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not 0 <= self.port <= 65535:
            raise QVGGTError(f"port must be 0..65535, got {self.port}")
        if not self.model_name or "/" in self.model_name:
            raise QVGGTError(f"model name must be a non-empty name without '/', got {self.model_name!r}")
        if self.max_frames is not None and self.max_frames < 1:
            raise QVGGTError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.max_concurrency < 1:
            raise QVGGTError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_queue < 0:
            raise QVGGTError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_mb <= 0:
            raise QVGGTError(f"max_body_mb must be > 0, got {self.max_body_mb}")
        if self.threads < 0:
            raise QVGGTError(f"threads must be >= 0, got {self.threads}")
        if self.shutdown_timeout_s < 0:
            raise QVGGTError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")


def build_server(config: ServeConfig, backend: Any = None) -> Any:
    """A ``uvicorn.Server`` for ``config`` (not started); ``backend`` defaults to :func:`open_backend`'s.

    Raises:
        MissingDependencyError: Starlette or uvicorn is not installed (extra ``serve``).
    """
    try:
        import uvicorn

        from qvggt_export.serve.app import AppLimits, create_app
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(exc.name or "uvicorn", "serve", "qvggt-export serve") from exc
    if backend is None:
        backend = open_backend(config.source, config.runtime, max_frames=config.max_frames, device=config.device,
                               threads=config.threads, ort_exact=config.ort_exact)
    limits = AppLimits(max_concurrency=config.max_concurrency, max_queue=config.max_queue,
                       max_body_bytes=int(config.max_body_mb * (1 << 20)))
    app = create_app(backend, config.model_name, limits)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                               timeout_graceful_shutdown=config.shutdown_timeout_s, lifespan="on")
    return uvicorn.Server(uv_config)


def serve(config: ServeConfig) -> None:
    """Serve until SIGINT / SIGTERM (blocking)."""
    server = build_server(config)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise QVGGTError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from exc
    host, port = sock.getsockname()[:2]
    logger.warning("serving model %r on http://%s:%d/v2/models/%s (KServe v2; Ctrl-C to stop)",
                   config.model_name, host, port, config.model_name)
    server.run(sockets=[sock])
