"""The root of NovaCron's typed errors.

Every error carries context (which VM, which peer, which phase ...) as keyword fields so that logs and
CLI output can say exactly where a failure happened. Subsystems subclass :class:`NovacronError`; the
CLI maps :class:`UserError` subclasses to exit code 2 (bad input) and everything else to 1 (failure).
"""

from __future__ import annotations

from typing import Any


class NovacronError(Exception):
    """A failure with structured context."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        if not self.context:
            return self.message
        ctx = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} ({ctx})"


class UserError(NovacronError):
    """The request itself is wrong (bad input, unknown name, conflict); retrying will not help."""


class NotFoundError(UserError):
    """A named object does not exist."""


class ConflictError(UserError):
    """The request conflicts with existing state (duplicate name, wrong state for the operation)."""
