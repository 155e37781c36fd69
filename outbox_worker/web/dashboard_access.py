"""Who may use the dashboard: the guard in front of every page, the session cookie, and the
routes that sign in and out.

Signing in posts the admin token once; the browser then holds the ``outbox_admin`` session
cookie, HttpOnly and SameSite=Strict: signed with the token (never the token itself), good for
12 hours, and dead everywhere once signed out (:mod:`outbox_worker.web.auth`, which also caps
wrong tokens per client address). Every page but the login page needs it, and every POST must
also come from a page of the same host (its Origin, or else its Referer, names this host): a
cross-site form cannot act. Behind a reverse proxy, keep the ``Host`` header as the browser
sent it.
"""

# No `from __future__ import annotations` here: signed_in_session's dependency names the app's
# session provider, which FastAPI can only see if its annotations are evaluated eagerly.
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Form, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncSession

from outbox_worker.web.auth import (
    COOKIE,
    SESSION_MAX_AGE,
    AdminAuth,
    cookie_value,
    is_revoked,
    revoke,
    token_matches,
    too_many_wrong_tokens,
)
from outbox_worker.web.dashboard_pages import (
    LOGIN,
    home,
    link,
    message,
    not_committed,
    redirect,
    render,
)
from outbox_worker.web.router import NotCommitted, SessionProvider, commit

RouteHandler = Callable[[Request], Coroutine[Any, Any, Response]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The settings of one dashboard router. Its routes are module functions, the same in
    every router made, so each request carries its own router's: :meth:`enter`, the first
    dependency of every dashboard route, puts them on ``request.state``."""

    auth: AdminAuth
    worker_seen_within: float | Callable[[Request], float]

    def seen_within(self, request: Request) -> float:
        if callable(self.worker_seen_within):
            return self.worker_seen_within(request)
        return self.worker_seen_within

    async def enter(self, request: Request) -> None:
        request.state.outbox_dashboard = self


async def current_dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.state.outbox_dashboard
    return dashboard


DashboardDep = Annotated[Dashboard, Depends(current_dashboard)]


# --- the guard ------------------------------------------------------------------------------


class SignedOut(Exception):
    """The request's session was signed out: a dependency finds it, the route answers."""


def same_origin(request: Request) -> bool:
    """The request's Origin (or, without one, its Referer) names this very host."""
    host = request.headers.get("host", "").lower()
    source = request.headers.get("origin") or request.headers.get("referer")
    if not host or not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host


def authenticated(auth: AdminAuth, request: Request) -> bool:
    try:
        auth(request)
    except HTTPException:
        return False
    return True


async def still_signed_in(auth: AdminAuth, request: Request, db: AsyncSession) -> bool:
    """A right bearer token, or a session cookie that is fresh and not signed out."""
    try:
        session = auth(request)
    except HTTPException:
        return False
    return session is None or not await is_revoked(db, session)


def disabled(request: Request) -> HTMLResponse:
    return message(
        request,
        status.HTTP_403_FORBIDDEN,
        "Admin is disabled",
        "No admin token is configured, so the dashboard and the admin API refuse every "
        "request. Set OUTBOX_ADMIN_TOKEN to a random secret (openssl rand -hex 32 makes "
        "one) and restart the service.",
    )


def cross_site(request: Request) -> HTMLResponse:
    return message(
        request,
        status.HTTP_403_FORBIDDEN,
        "Request refused",
        "This form was not sent from a page of this site (its Origin or Referer header "
        "does not name this host), so it was not acted on.",
    )


def refusal(auth: AdminAuth, request: Request) -> Response | None:
    """What a protected page answers instead of itself, if anything."""
    if request.method not in SAFE_METHODS and not same_origin(request):
        return cross_site(request)
    try:
        auth(request)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_403_FORBIDDEN:
            return disabled(request)
        if exc.status_code == status.HTTP_429_TOO_MANY_REQUESTS:
            response = message(request, exc.status_code, "Too many wrong tokens", exc.detail)
            response.headers.update(exc.headers or {})
            return response
        return to_login(request)
    return None


def to_login(request: Request) -> RedirectResponse:
    """To the login form, and back here after it. The session cookie that brought the request
    here (expired, signed out, of another token) is of no more use: dropped."""
    back = request.url.path if request.method in SAFE_METHODS else home(request)
    if request.method in SAFE_METHODS and request.url.query:
        back = f"{back}?{request.url.query}"
    response = redirect(request, link(request, LOGIN, {"next": back}))
    if COOKIE in request.cookies:
        end_session(request, response)
    return response


def protected_route(auth: AdminAuth) -> type[APIRoute]:
    """Routes that answer a login redirect (or a refusal) before resolving any dependency,
    so an anonymous request never opens a database session; a signed-out session, which
    takes the database to find, is sent to the login form too."""

    class ProtectedRoute(APIRoute):
        def get_route_handler(self) -> RouteHandler:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                refused = refusal(auth, request)
                if refused is not None:
                    return refused
                try:
                    return await handler(request)
                except SignedOut:
                    return to_login(request)

            return guarded

    return ProtectedRoute


def signed_in_session(
    get_session: SessionProvider, auth: AdminAuth
) -> Callable[..., Coroutine[Any, Any, None]]:
    """The protected routes' dependency: the app's session, first asked whether the request's
    sign-in was signed out, then kept for the route (:func:`route_session`)."""

    async def check(
        request: Request,
        session: Annotated[AsyncSession, Depends(get_session, scope="function")],
    ) -> None:
        if not await still_signed_in(auth, request, session):
            raise SignedOut
        request.state.outbox_dashboard_session = session

    return check


async def route_session(request: Request) -> AsyncSession:
    """The session :func:`signed_in_session` checked the sign-in with: the route's queries run
    in the same transaction."""
    session: AsyncSession = request.state.outbox_dashboard_session
    return session


SessionDep = Annotated[AsyncSession, Depends(route_session)]


# --- the session cookie ---------------------------------------------------------------------


def start_session(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        COOKIE,
        cookie_value(token),
        max_age=SESSION_MAX_AGE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def end_session(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def safe_next(request: Request, target: str | None) -> str:
    """Where to go after signing in: a dashboard page of this site, never elsewhere."""
    start = home(request)
    if (
        target
        and (target == start or target.startswith((start + "/", start + "?")))
        and "//" not in target
        and "\\" not in target
        and target.isprintable()
    ):
        return target
    return start


# --- signing in and out ---------------------------------------------------------------------


def login_page(
    request: Request,
    target: str,
    *,
    status_code: int = status.HTTP_200_OK,
    error: str | None = None,
) -> HTMLResponse:
    return render(
        request, "login.html", status_code=status_code, signed_in=False, next=target, error=error
    )


async def login_form(
    request: Request,
    dashboard: DashboardDep,
    next_page: Annotated[str | None, Query(alias="next")] = None,
) -> Response:
    if dashboard.auth.token(request) is None:
        return disabled(request)
    if authenticated(dashboard.auth, request):
        return redirect(request, safe_next(request, next_page))
    return login_page(request, safe_next(request, next_page))


async def login(
    request: Request,
    dashboard: DashboardDep,
    token: Annotated[str, Form()] = "",
    next_page: Annotated[str, Form(alias="next")] = "",
) -> Response:
    if not same_origin(request):
        return cross_site(request)
    auth = dashboard.auth
    expected = auth.token(request)
    if expected is None:
        return disabled(request)
    target = safe_next(request, next_page)
    retry_after = auth.wrong_tokens.retry_after(request)
    if retry_after is not None:
        refused = login_page(
            request,
            target,
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            error=f"{too_many_wrong_tokens(retry_after)}.",
        )
        refused.headers["Retry-After"] = str(retry_after)
        return refused
    if not token_matches(expected, token.strip()):
        auth.wrong_tokens.record(request)
        return login_page(
            request,
            target,
            status_code=status.HTTP_401_UNAUTHORIZED,
            error="That is not the admin token (OUTBOX_ADMIN_TOKEN). Try again.",
        )
    response = redirect(request, target)
    start_session(request, response, expected)
    return response


async def logout(request: Request, dashboard: DashboardDep, session: SessionDep) -> Response:
    signed_in = dashboard.auth(request)
    if signed_in is not None:  # a session cookie, not the bearer token
        await revoke(session, signed_in)
        try:
            await commit(session, "This session was not signed out")
        except NotCommitted as exc:
            # The cookie is kept: the session it holds was not ended, and still works.
            return not_committed(request, "Not signed out", exc)
    response = redirect(request, link(request, LOGIN), flash=("ok", "Signed out."))
    end_session(request, response)
    return response
