"""The admin bearer token: refused for everyone when none is configured (never open by
default), compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from fastapi import HTTPException, Request, status

COOKIE = "outbox_admin"


def cookie_value(token: str) -> str:
    """What the dashboard's cookie holds: derived from the token, never the token itself."""
    return hmac.new(token.encode(), b"pgoutbox dashboard session", hashlib.sha256).hexdigest()


def token_matches(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


TokenSource = str | None | Callable[[Request], str | None]


class AdminAuth:
    """A FastAPI dependency: a bearer token, or (for the dashboard) its cookie.

    The token is a string, or a function of the request (an app that builds its settings
    in its lifespan reads it from there)."""

    def __init__(self, token: TokenSource, *, accept_cookie: bool = False) -> None:
        self._token = token
        # Only the dashboard, which checks Origin on its own forms, takes the cookie: the
        # JSON routes want the bearer token, so no page can drive them with a browser cookie.
        self._accept_cookie = accept_cookie

    def token(self, request: Request) -> str | None:
        token = self._token(request) if callable(self._token) else self._token
        return token or None

    def __call__(self, request: Request) -> None:
        token = self.token(request)
        if token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "admin routes are disabled: set OUTBOX_ADMIN_TOKEN to enable them",
            )
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and given and token_matches(token, given.strip()):
            return
        cookie = request.cookies.get(COOKIE) if self._accept_cookie else None
        if cookie and token_matches(cookie_value(token), cookie):
            return
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <OUTBOX_ADMIN_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
