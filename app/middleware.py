"""The limit on request bodies (X-Request-ID comes from the library's RequestIdMiddleware)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.status import HTTP_413_CONTENT_TOO_LARGE
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
