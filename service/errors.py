"""Errors the service answers with: each knows its HTTP status and its `type` in the envelope.

Everything below the routes raises these; `service/api/app.py` turns them into
`{"error": {"message", "type", "code"}}` with `code` = the HTTP status.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error with a status, a stable machine-readable type and a human message."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, items: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.items = items
        self.headers: dict[str, str] = {}


class UnknownItems(ServiceError):
    """Items (candidates or history) that the store does not know and that carry no title."""

    status = 422
    type = "unknown_items"


class PromptTooLong(ServiceError):
    """A prompt would not fit the model's context."""

    status = 422
    type = "prompt_too_long"


class TooLarge(ServiceError):
    """Too many candidates or history entries, or a body over the size limit."""

    status = 413
    type = "too_large"


class Unauthorized(ServiceError):
    """Missing or wrong bearer token."""

    status = 401
    type = "unauthorized"

    def __init__(self, message: str = "missing or invalid bearer token") -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": "Bearer"}


class QueueFull(ServiceError):
    """The model queue is full; the client should retry after `retry_after` seconds."""

    status = 429
    type = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class DeadlineExceeded(ServiceError):
    """The caller's own timeout (X-Request-Timeout-Ms) passed before its work ran.

    A 429, not a 5xx: the server is overloaded for this caller's budget (the service answers
    no 5xx for anything a client sends); retry after `retry_after` seconds or with more time.
    """

    status = 429
    type = "deadline_exceeded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class ClientClosed(ServiceError):
    """The client disconnected before its answer was ready; its work was dropped."""

    status = 499
    type = "client_closed"


class StoreUnavailable(ServiceError):
    """The embedding store cannot be reached, or holds no servable version."""

    status = 503
    type = "store_unavailable"


class ShuttingDown(ServiceError):
    """The server is draining after SIGTERM and takes no new work."""

    status = 503
    type = "shutting_down"


class NotReady(ServiceError):
    """The model or the store is not ready yet."""

    status = 503
    type = "not_ready"
