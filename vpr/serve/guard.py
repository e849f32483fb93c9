"""Checks that run before a request's body is read: bearer token (401), body size (413), requests in flight (503).

A plain ASGI middleware, so a refused upload is never spooled to disk and the refusal costs nothing.
"""

from __future__ import annotations

import json
import secrets

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PUBLIC_PATHS = frozenset(("/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/favicon.ico"))
PUBLIC_PREFIX = "/static/"
RETRY_AFTER_S = 1


class BodyTooLarge(HTTPException):
    """A request body that passed the size limit while it streamed in (FastAPI passes HTTPExceptions through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit:,} bytes; send smaller or fewer images")


class Guard:
    """ASGI middleware: the token on every non-public path, the body limit, and at most `max_in_flight`
    concurrent requests on `limited_paths` (the count is `in_flight`)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int, max_in_flight: int,
                 limited_paths: frozenset[str] = frozenset(("/query",))) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.limited_paths = limited_paths
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.token is not None and not (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)) and not self._authorised(scope):
            await _error(send, 401, "missing or wrong bearer token: send the header 'Authorization: Bearer TOKEN'",
                         {"www-authenticate": "Bearer"})
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _error(send, 413, BodyTooLarge(self.max_body_bytes).detail)
            return
        if path not in self.limited_paths:
            await self.app(scope, self._limited(receive), send)
            return
        if self.in_flight >= self.max_in_flight:
            await _error(send, 503, f"server busy: {self.in_flight} requests in flight; retry in {RETRY_AFTER_S} s",
                         {"retry-after": str(RETRY_AFTER_S)})
            return
        self.in_flight += 1
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.in_flight -= 1

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token.encode())

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that raises `BodyTooLarge` once the body streamed so far passes the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return limited


def _content_length(scope: Scope) -> int | None:
    value = dict(scope["headers"]).get(b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


async def _error(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error response `{"detail": ...}`, as FastAPI writes its own."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
