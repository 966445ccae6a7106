"""What the serving engine refuses, in its own terms; the HTTP app (app.py) maps each kind to a status code."""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine refuses. `code` is a stable machine-readable name (OpenAI-style error code)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code


class InvalidRequest(EngineError):
    """The request itself is wrong (a bad name, a prompt over the limit, an unreadable adapter)."""


class NotAllowed(EngineError):
    """The server's settings forbid it (runtime loading disabled, a path outside the adapter root)."""


class NotFound(EngineError):
    """It names a model, adapter or directory that is not there."""


class Conflict(EngineError):
    """It clashes with the engine's current state (already loaded, being deleted)."""
