"""Checks that run before a request's body is read: bearer token (401), body size (413), requests in flight (503),
and while it streams in: size (413) and a minimum upload rate (408), so a client trickling bytes cannot hold
a slot. Queries and thumbnails both count as requests in flight.

A plain ASGI middleware, so a refused upload is never spooled to disk and the refusal costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PUBLIC_PATHS = frozenset(("/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/favicon.ico"))
PUBLIC_PREFIX = "/static/"
RETRY_AFTER_S = 1


class BodyTooLarge(HTTPException):
    """A request body that passed the size limit while it streamed in (FastAPI passes HTTPExceptions through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit:,} bytes; send smaller or fewer images")


class BodyTooSlow(HTTPException):
    """A request body arriving slower than the server's minimum upload rate."""

    def __init__(self, rate: int) -> None:
        super().__init__(408, f"request body arriving slower than {rate // 1024} KiB/s; send it again on a faster link")


class Guard:
    """ASGI middleware: the token on every non-public path, the body limit and upload rate, and at most
    `max_in_flight` concurrent requests on the paths starting with `limited_prefixes` (the count is `in_flight`)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int, max_in_flight: int,
                 limited_prefixes: tuple[str, ...] = ("/query", "/images/"), min_upload_rate: int = 32 * 1024,
                 upload_grace_s: float = 5.0) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.limited_prefixes = limited_prefixes
        self.min_upload_rate = min_upload_rate
        self.upload_grace_s = upload_grace_s
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
        if not path.startswith(self.limited_prefixes):
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
        """`receive` that raises `BodyTooLarge` once the body streamed so far passes the limit, and
        `BodyTooSlow` once it falls behind the minimum upload rate (after the grace period)."""
        received, complete = 0, False
        start = time.monotonic()

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what comes next is the client leaving, whenever it does
                return await receive()
            deadline = start + self.upload_grace_s + received / self.min_upload_rate
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.min_upload_rate) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
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
