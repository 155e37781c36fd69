"""X-Request-ID in and out, the correlation id that enqueue stores with each job, and the
limit on request bodies."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.status import HTTP_413_CONTENT_TOO_LARGE
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox_worker import current_correlation_id

REQUEST_ID_HEADER = "x-request-id"
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's id when it is 1-128 characters of [A-Za-z0-9._:-], else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _VALID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware) so the contextvar reaches the route's task."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        # Kept on the request too, for the 500 handler, which runs outside this middleware.
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_correlation_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_correlation_id.reset(token)


class BodyTooLarge(HTTPException):
    """The 413 for a body over ``limit`` bytes; the connection closes, since the rest of the
    body is never read."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            HTTP_413_CONTENT_TOO_LARGE,
            f"the request body is larger than {limit} bytes",
            headers={"Connection": "close"},
        )


class BodySizeLimitMiddleware:
    """Refuses a request body over ``max_bytes(scope)`` with a JSON 413, holding no more of
    it than the limit.

    A Content-Length over the limit is refused before the app runs. Otherwise the bytes are
    counted as the app reads them, which covers chunked bodies and bodies longer than their
    Content-Length said: the read that crosses the limit raises :class:`BodyTooLarge`, an
    HTTPException that FastAPI's body parsing lets through to its handler. The limit is a
    function of the request because the service reads its settings in the lifespan, after
    the app (and so FastAPI's own ``max_body_size``, fixed when it is built) exists.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[Scope], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes(scope)
        if (declared_length(scope) or 0) > limit:
            refusal = BodyTooLarge(limit)
            response = JSONResponse(
                {"detail": refusal.detail}, refusal.status_code, headers=refusal.headers
            )
            await response(scope, receive, send)
            return
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, receive_counted, send)


def declared_length(scope: Scope) -> int | None:
    """The Content-Length header, when it is a number (the count guards the rest)."""
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None
