"""Admin authentication: the bearer token, the dashboard's session cookie, and a cap on wrong
tokens.

The token is refused for everyone when none is configured (never open by default), and
compared in constant time.

**Sessions.** Signing in to the dashboard sets the ``outbox_admin`` cookie: a random session
id and its sign-in time, signed with an HMAC keyed by the token (itsdangerous), so it is
derived from the token and never holds it. It is good for ``SESSION_MAX_AGE`` (12 h) from
sign-in, checked here against the signed time on every request (the cookie's own Max-Age only
asks the browser to drop it). Signing out records the session id in
``outbox_revoked_sessions`` until the cookie would have expired, and every dashboard request
looks there: a copy of the cookie stops working at sign-out, in every process of the app and
after restarts, since the database is what they share. (A list in each process would be
unknown to the others and lost at restart; a sign-out epoch would sign every operator out.)
What this stateless cookie cannot do: a copy taken before sign-out works until then, and for
12 h when its owner never signs out. Changing OUTBOX_ADMIN_TOKEN ends every session at once.

**Wrong tokens.** A client address may send ``WRONG_TOKENS`` (5 a minute) wrong tokens, to
the login form or in Authorization headers; past that every token from it is refused with 429
and Retry-After, the right one too (else the guessing would go on, read off the status). The
count lives in this process (limits' in-memory moving window), one per ``AdminAuth`` (the JSON
routes and the dashboard each have one): N processes allow N times as many. The address is the
one the server sees: behind a reverse proxy, run uvicorn with ``--proxy-headers`` and
``--forwarded-allow-ips``, or all clients share the proxy's budget.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import HTTPException, Request, status
from itsdangerous import BadData, TimestampSigner
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

COOKIE = "outbox_admin"
SESSION_MAX_AGE = 12 * 3600
WRONG_TOKENS = RateLimitItemPerMinute(5)

_REVOKE = text(
    "INSERT INTO outbox_revoked_sessions (id, expires_at) VALUES (:id, :expires_at) "
    "ON CONFLICT (id) DO NOTHING"
)
# By this process's clock, the one that decides when a cookie expires.
_PRUNE_REVOKED = text("DELETE FROM outbox_revoked_sessions WHERE expires_at < :now")
_IS_REVOKED = text("SELECT EXISTS (SELECT FROM outbox_revoked_sessions WHERE id = :id)")


def _signer(token: str) -> TimestampSigner:
    return TimestampSigner(token, salt="pgoutbox dashboard session", digest_method=hashlib.sha256)


def cookie_value(token: str) -> str:
    """The cookie of a new session: a random id and the time now, signed with the token."""
    return _signer(token).sign(secrets.token_urlsafe(16)).decode()


@dataclass(frozen=True, slots=True)
class AdminSession:
    id: str
    expires_at: datetime


def read_session(token: str, cookie: str | None) -> AdminSession | None:
    """The session in a cookie, if this token signed it less than SESSION_MAX_AGE ago."""
    if not cookie:
        return None
    try:
        session_id, signed_at = _signer(token).unsign(
            cookie, max_age=SESSION_MAX_AGE, return_timestamp=True
        )
    except BadData:
        return None
    return AdminSession(session_id.decode(), signed_at + timedelta(seconds=SESSION_MAX_AGE))


async def revoke(db: AsyncSession, session: AdminSession) -> None:
    """Signs the session out everywhere, and forgets those that have expired anyway."""
    await db.execute(_PRUNE_REVOKED, {"now": datetime.now(UTC)})
    await db.execute(_REVOKE, {"id": session.id, "expires_at": session.expires_at})


async def is_revoked(db: AsyncSession, session: AdminSession) -> bool:
    return bool((await db.execute(_IS_REVOKED, {"id": session.id})).scalar())


def token_matches(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class WrongTokens:
    """The wrong tokens each client address sent in the last minute, in this process."""

    def __init__(self) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def retry_after(self, request: Request) -> int | None:
        """Seconds until the request's address may try a token again; None: it may now."""
        address = client_address(request)
        if self._limiter.test(WRONG_TOKENS, address):
            return None
        reset_at = self._limiter.get_window_stats(WRONG_TOKENS, address).reset_time
        return max(1, math.ceil(reset_at - time.time()))

    def record(self, request: Request) -> None:
        self._limiter.hit(WRONG_TOKENS, client_address(request))


def too_many_wrong_tokens(retry_after: int) -> str:
    return f"Too many wrong admin tokens from your address: try again in {retry_after} s"


TokenSource = str | None | Callable[[Request], str | None]


class AdminAuth:
    """A FastAPI dependency: a bearer token, or (for the dashboard) its session cookie.

    The token is a string, or a function of the request (an app that builds its settings
    in its lifespan reads it from there). Whether a cookie's session was signed out is for
    the dashboard to check: that takes the database."""

    def __init__(self, token: TokenSource, *, accept_cookie: bool = False) -> None:
        self._token = token
        # Only the dashboard, which checks Origin on its own forms, takes the cookie: the
        # JSON routes want the bearer token, so no page can drive them with a browser cookie.
        self._accept_cookie = accept_cookie
        self.wrong_tokens = WrongTokens()

    def token(self, request: Request) -> str | None:
        token = self._token(request) if callable(self._token) else self._token
        return token or None

    def __call__(self, request: Request) -> AdminSession | None:
        """Who is asking: None for the bearer token, the session for a cookie."""
        token = self.token(request)
        if token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "admin routes are disabled: set OUTBOX_ADMIN_TOKEN to enable them",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            retry_after = self.wrong_tokens.retry_after(request)
            if retry_after is not None:
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    too_many_wrong_tokens(retry_after),
                    headers={"Retry-After": str(retry_after)},
                )
            if token_matches(token, given.strip()):
                return None
            self.wrong_tokens.record(request)
        if self._accept_cookie and (session := read_session(token, request.cookies.get(COOKIE))):
            return session
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <OUTBOX_ADMIN_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
