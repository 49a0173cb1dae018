"""The one TensorRT logger of the engine stage: it captures TensorRT's messages (for build logs and error
messages) and forwards them to Python logging. Used by the builder (:mod:`qvggt_export.engine.build`) and the
runtime (:mod:`qvggt_export.engine.runtime`); works with TensorRT and TensorRT-RTX alike (the module is passed
in, so nothing here imports TensorRT).
"""

from __future__ import annotations

import collections
import logging
import re
from types import ModuleType
from typing import Any

# ILogger.Severity values, identical in TensorRT and TensorRT-RTX (lower = more severe).
INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)
SEVERITY_TO_LOGGING = {INTERNAL_ERROR: logging.ERROR, ERROR: logging.ERROR, WARNING: logging.WARNING,
                       INFO: logging.DEBUG}
# Benign warnings shown at DEBUG only (kept in the captured records): every builder or runtime after the first in
# a process warns that its logger differs from the first one's (each still reports to its own logger, checked
# with TensorRT-RTX 1.7.1); a second builder instance warns that the first one's output tensors are not queryable.
BENIGN_WARNING_RE = re.compile(
    "already exists, the output tensors of this new instance will not be queryable|differs from one already registered")


def make_capturing_logger(trt: ModuleType, forward_to: logging.Logger, *, keep_prefixes: tuple[str, ...] = (),
                          max_records: int | None = None) -> Any:
    """A ``trt.ILogger`` that records ``(severity, message)`` pairs and forwards them to ``forward_to``.

    Args:
        trt: The loaded ``tensorrt`` / ``tensorrt_rtx`` module (the base class lives there).
        forward_to: The Python logger TensorRT's messages go to (INFO and below at DEBUG level).
        keep_prefixes: VERBOSE messages starting with one of these are recorded too (the builder's per-layer
            report); other VERBOSE messages are dropped (thousands of records for VGGT-1B).
        max_records: Keep only the latest records (a ring: a runtime that runs for days must not grow it);
            ``None`` keeps all.

    The logger has ``records`` (iterable of ``(severity, message)``), ``count`` (messages ever recorded, to mark
    where an operation's messages start) and ``since(mark, max_level)``.
    """

    class _CapturingLogger(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.records: collections.deque[tuple[int, str]] = collections.deque(maxlen=max_records)
            self.count = 0

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= INFO or (keep_prefixes and msg.startswith(keep_prefixes)):
                self.records.append((level, msg))
                self.count += 1
            if level in SEVERITY_TO_LOGGING:
                python_level = SEVERITY_TO_LOGGING[level]
                # Keep this callback to plain calls: a generator expression here hung the build (observed
                # repeatedly with TensorRT-RTX 1.7.1 inside pytest).
                if level == WARNING and BENIGN_WARNING_RE.search(msg):
                    python_level = logging.DEBUG  # kept in the records, not shown to the user
                forward_to.log(python_level, "%s", msg)

        def since(self, mark: int, max_level: int = INFO) -> list[str]:
            new = list(self.records)[-(self.count - mark):] if self.count > mark else []
            return [msg for level, msg in new if level <= max_level]

    return _CapturingLogger()
