"""X-Request-ID in and out, and the correlation id that enqueue stores with each job.

Mount it in any FastAPI or Starlette app (``app.add_middleware(RequestIdMiddleware)``):
every answer then carries ``X-Request-ID``, the client's own when it is 1-128 characters of
``[A-Za-z0-9._:-]``, else a new one; and every job the request enqueues stores it as its
``correlation_id``, which the worker binds to each log line of the job.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox_worker.context import current_correlation_id

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
    """Pure ASGI (not BaseHTTPMiddleware), so that the contextvar reaches the route's task.

    The id is also kept as ``request.state.request_id``, for an app's handler of unexpected
    errors, which Starlette runs outside every user middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
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
