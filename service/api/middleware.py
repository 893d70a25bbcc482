"""The outermost ASGI layer: request metrics, authentication, the body size limit, a last-resort 500.

It sits outside FastAPI so that a request without the right token is refused before its
body is read (authentication comes first), an oversized body is refused before anything
parses it, every answer (errors included) is timed, and no exception escapes to the server.
"""

from __future__ import annotations

import json
import logging
import time

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sellarec.service.api.auth import bearer_matches
from sellarec.service.api.schemas import ErrorBody, ErrorResponse
from sellarec.service.metrics import Metrics

log = logging.getLogger(__name__)

#: Paths that get their own `endpoint` label; anything else is "other" (bounded cardinality).
ENDPOINTS = frozenset(
    {"/score", "/rerank", "/events", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
)


def error_body(status: int, kind: str, message: str, items: list[str] | None = None) -> bytes:
    """The JSON of the error envelope."""
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, code=status, items=items))
    return json.dumps(body.model_dump(exclude_none=True)).encode()


class Guard:
    """Times every request, checks the token on `guarded` paths, refuses bodies over
    `max_body_bytes`, never lets an exception out."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        token: SecretStr | None = None,
        guarded: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            if self.token is not None and path in self.guarded and not self._authorized(scope):
                status = 401
                await self._error(send, 401, "unauthorized", "missing or invalid bearer token",
                                  [(b"www-authenticate", b"Bearer")])  # fmt: skip
                return
            body = await self._read_body(scope, receive)
            if body is None:
                status = 413
                await self._error(send, 413, "too_large", f"request body over {self.max_body_bytes} bytes")
                return
            await self.app(scope, self._replay(body, receive), send_wrapper)
        except Exception:
            if started:  # the app already answered (its 500 handler, or mid-stream): just log
                log.exception("error after the response started on %s", path)
            else:
                log.exception("unhandled error on %s", path)
                status = 500
                await self._error(send, 500, "internal_error", "internal error; see the server log")
        finally:
            self.metrics.request_seconds.labels(endpoint=endpoint, status=str(status)).observe(
                time.perf_counter() - start
            )

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return bearer_matches(value.decode("latin-1"), self.token)
        return False

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None if it exceeds the limit (by header or by count)."""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        """A `receive` that yields the buffered body once, then defers to the real one."""
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _error(
        self, send: Send, status: int, kind: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.metrics.errors.labels(type=kind).inc()
        payload = error_body(status, kind, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += extra or []
        if status in (401, 413):  # the body was not read: the connection cannot be reused
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
