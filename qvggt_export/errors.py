"""The one exception type for user-facing errors.

Everything a user can get wrong (paths, configs, flags, data) raises :class:`QVGGTError` with a message
that says what was expected and what was found. The CLI prints these without a stack trace; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QVGGTError(Exception):
    """A user-facing error: bad input, missing optional dependency, unsupported combination."""


class MissingDependencyError(QVGGTError):
    """An optional dependency is not installed; the message carries the install hint."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'qvggt-export[{extra}]'"
        )
        self.package = package
        self.extra = extra
