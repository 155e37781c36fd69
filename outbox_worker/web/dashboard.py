"""The dashboard: small server-rendered pages under ``/dashboard``, over the same admin
service as the JSON routes and the CLI (:mod:`outbox_worker.admin`), so the faces agree.

- ``/dashboard``: queues (depth by state, age of the oldest due job) and the workers alive.
- ``/dashboard/jobs``: the job list, filtered by state, queue and task, a page at a time.
- ``/dashboard/jobs/{id}``: one job, with Retry and Cancel.

Retry, Cancel and signing out commit their change before they flash it as done (as the JSON
routes do, :func:`outbox_worker.web.router.commit`); a change the database refuses to commit
is a 500 page that says so.

Signing in posts the admin token once; the browser then holds the ``outbox_admin`` session
cookie, HttpOnly and SameSite=Strict: signed with the token (never the token itself), good for
12 hours, and dead everywhere once signed out (:mod:`outbox_worker.web.auth`, which also caps
wrong tokens per client address). Every page but the login page needs it, and every POST must
also come from a page of the same host (its Origin, or else its Referer, names this host): a
cross-site form cannot act. Behind a reverse proxy, keep the ``Host`` header as the browser
sent it.
"""

# No `from __future__ import annotations` here: the routes' annotations name a dependency
# built inside create_dashboard_router, which FastAPI can only see if they are evaluated
# eagerly (as in router.py).
import base64
import binascii
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from outbox_worker import admin
from outbox_worker.errors import InvalidRequest, JobNotFound, JobStateConflict
from outbox_worker.formatting import format_duration as format_duration
from outbox_worker.formatting import format_relative, format_time
from outbox_worker.jobs import JobState
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
from outbox_worker.web.router import NotCommitted, commit

SessionProvider = Callable[..., AsyncIterator[AsyncSession]]
RouteHandler = Callable[[Request], Coroutine[Any, Any, Response]]

REFRESH_SECONDS = 5
PAGE_SIZE = 50
STATS_WINDOW_SECONDS = 300.0
FLASH_COOKIE = "outbox_flash"
# What browsers keep of one cookie, and more than encode_flash writes: a longer value is not
# one of ours, and is not decoded.
MAX_FLASH_COOKIE = 4096
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

HOME = "outbox_dashboard"
LOGIN = "outbox_dashboard_login"
LOGOUT = "outbox_dashboard_logout"
JOBS = "outbox_dashboard_jobs"
JOB = "outbox_dashboard_job"
RETRY = "outbox_dashboard_retry"
CANCEL = "outbox_dashboard_cancel"


# --- formatting, as Jinja filters -----------------------------------------------------------
# Times and durations: outbox_worker.formatting's, which the CLI's tables use too
# (format_duration is imported as itself: importable from here, where it was first).


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def first_line(text: str | None, width: int = 90) -> str:
    if not text:
        return ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # A traceback's last line names the exception; anything else reads best from the top.
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines or [""])[0]
    return line if len(line) <= width else line[: width - 1] + "…"


templates = Environment(
    loader=PackageLoader("outbox_worker.web", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(
    duration=format_duration,
    when=format_time,
    ago=format_relative,
    pretty_json=pretty_json,
    first_line=first_line,
)


# --- requests: origin, flash, links ---------------------------------------------------------


def same_origin(request: Request) -> bool:
    """The request's Origin (or, without one, its Referer) names this very host."""
    host = request.headers.get("host", "").lower()
    source = request.headers.get("origin") or request.headers.get("referer")
    if not host or not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host


def link(request: Request, name: str, query: Mapping[str, Any] | None = None, **params: Any) -> str:
    """The path of one of the dashboard's routes, wherever the app mounted the router."""
    path = request.url_for(name, **params).path
    kept = {key: value for key, value in (query or {}).items() if value not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


class Flash(BaseModel):
    kind: Literal["ok", "error"]
    text: str


def encode_flash(kind: str, text: str) -> str:
    raw = json.dumps({"kind": kind, "text": text[:500]}, ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_flash(value: str | None) -> Flash | None:
    """The message a flash cookie holds, or None, whatever the cookie holds: pydantic's JSON
    parser refuses what is not UTF-8 and nesting past its recursion limit."""
    if not value or len(value) > MAX_FLASH_COOKIE:
        return None
    try:
        return Flash.model_validate_json(base64.urlsafe_b64decode(value))
    except (binascii.Error, ValueError):
        return None


def blank(value: str | None) -> str | None:
    """An empty form field is no filter."""
    value = (value or "").strip()
    return value or None


class Pages:
    """Rendering and the answers every page shares (login redirect, refusals)."""

    def __init__(self, auth: AdminAuth) -> None:
        self.auth = auth

    def home(self, request: Request) -> str:
        return link(request, HOME)

    def authenticated(self, request: Request) -> bool:
        try:
            self.auth(request)
        except HTTPException:
            return False
        return True

    def render(
        self,
        request: Request,
        template: str,
        *,
        status_code: int = status.HTTP_200_OK,
        refresh: int | None = None,
        signed_in: bool = True,
        **context: Any,
    ) -> HTMLResponse:
        flash = decode_flash(request.cookies.get(FLASH_COOKIE))
        html = templates.get_template(template).render(
            url=lambda name, query=None, **params: link(request, name, query, **params),
            states=[state.value for state in JobState],
            now=datetime.now(UTC),
            refresh=refresh,
            signed_in=signed_in,
            flash=flash,
            **context,
        )
        response = HTMLResponse(html, status_code=status_code)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        # No script, no frame, forms only to this site: the pages need nothing else.
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Referrer-Policy"] = "same-origin"
        if FLASH_COOKIE in request.cookies:
            response.delete_cookie(FLASH_COOKIE, path=self.home(request))
        return response

    def message(
        self, request: Request, status_code: int, title: str, text: str, *, signed_in: bool = False
    ) -> HTMLResponse:
        return self.render(
            request,
            "message.html",
            status_code=status_code,
            signed_in=signed_in,
            title=title,
            text=text,
        )

    def disabled(self, request: Request) -> HTMLResponse:
        return self.message(
            request,
            status.HTTP_403_FORBIDDEN,
            "Admin is disabled",
            "No admin token is configured, so the dashboard and the admin API refuse every "
            "request. Set OUTBOX_ADMIN_TOKEN to a random secret (openssl rand -hex 32 makes "
            "one) and restart the service.",
        )

    def not_committed(self, request: Request, title: str, exc: NotCommitted) -> HTMLResponse:
        return self.message(
            request,
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            title,
            f"{exc}. Nothing was changed.",
            signed_in=True,
        )

    def cross_site(self, request: Request) -> HTMLResponse:
        return self.message(
            request,
            status.HTTP_403_FORBIDDEN,
            "Request refused",
            "This form was not sent from a page of this site (its Origin or Referer header "
            "does not name this host), so it was not acted on.",
        )

    def redirect(
        self, request: Request, url: str, *, flash: tuple[str, str] | None = None
    ) -> RedirectResponse:
        """A 303 to ``url``, with a message for the next page shown (a short-lived cookie
        on the dashboard's path only)."""
        response = RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)
        if flash is not None:
            response.set_cookie(
                FLASH_COOKIE,
                encode_flash(*flash),
                max_age=60,
                path=self.home(request),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    def refusal(self, request: Request) -> Response | None:
        """What a protected page answers instead of itself, if anything."""
        if request.method not in SAFE_METHODS and not same_origin(request):
            return self.cross_site(request)
        try:
            self.auth(request)
        except HTTPException as exc:
            if exc.status_code == status.HTTP_403_FORBIDDEN:
                return self.disabled(request)
            if exc.status_code == status.HTTP_429_TOO_MANY_REQUESTS:
                response = self.message(
                    request, exc.status_code, "Too many wrong tokens", exc.detail
                )
                response.headers.update(exc.headers or {})
                return response
            return self.to_login(request)
        return None

    def to_login(self, request: Request) -> RedirectResponse:
        """To the login form, and back here after it. The session cookie that brought the
        request here (expired, signed out, of another token) is of no more use: dropped."""
        back = request.url.path if request.method in SAFE_METHODS else self.home(request)
        if request.method in SAFE_METHODS and request.url.query:
            back = f"{back}?{request.url.query}"
        response = self.redirect(request, link(request, LOGIN, {"next": back}))
        if COOKIE in request.cookies:
            self.end_session(request, response)
        return response

    async def signed_in(self, request: Request, db: AsyncSession) -> bool:
        """A right bearer token, or a session cookie that is fresh and not signed out."""
        try:
            session = self.auth(request)
        except HTTPException:
            return False
        return session is None or not await is_revoked(db, session)

    def start_session(self, request: Request, response: Response, token: str) -> None:
        response.set_cookie(
            COOKIE,
            cookie_value(token),
            max_age=SESSION_MAX_AGE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def end_session(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            COOKIE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def safe_next(self, request: Request, target: str | None) -> str:
        """Where to go after signing in: a dashboard page of this site, never elsewhere."""
        home = self.home(request)
        if (
            target
            and (target == home or target.startswith((home + "/", home + "?")))
            and "//" not in target
            and "\\" not in target
            and target.isprintable()
        ):
            return target
        return home


class SignedOut(Exception):
    """The request's session was signed out: a dependency finds it, the route answers."""


def protected_route(pages: Pages) -> type[APIRoute]:
    """Routes that answer a login redirect (or a refusal) before resolving any dependency,
    so an anonymous request never opens a database session; a signed-out session, which
    takes the database to find, is sent to the login form too."""

    class ProtectedRoute(APIRoute):
        def get_route_handler(self) -> RouteHandler:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                refusal = pages.refusal(request)
                if refusal is not None:
                    return refusal
                try:
                    return await handler(request)
                except SignedOut:
                    return pages.to_login(request)

            return guarded

    return ProtectedRoute


def create_dashboard_router(
    *,
    get_session: SessionProvider,
    auth: AdminAuth,
    worker_seen_within_seconds: float | Callable[[Request], float] = 60.0,
) -> APIRouter:
    """The dashboard's pages; ``create_admin_router`` includes them next to the JSON routes."""

    def seen_within(request: Request) -> float:
        if callable(worker_seen_within_seconds):
            return worker_seen_within_seconds(request)
        return worker_seen_within_seconds

    pages = Pages(auth)
    session_dep = Annotated[AsyncSession, Depends(get_session, scope="function")]

    async def not_signed_out(request: Request, session: session_dep) -> None:
        if not await pages.signed_in(request, session):
            raise SignedOut

    public = APIRouter(tags=["dashboard"], include_in_schema=False)
    protected = APIRouter(
        tags=["dashboard"],
        include_in_schema=False,
        route_class=protected_route(pages),
        dependencies=[Depends(not_signed_out)],
    )

    # --- signing in and out -----------------------------------------------------------------

    @public.get("/dashboard/login", name=LOGIN, response_class=HTMLResponse)
    async def login_form(
        request: Request, next_page: Annotated[str | None, Query(alias="next")] = None
    ) -> Response:
        if auth.token(request) is None:
            return pages.disabled(request)
        if pages.authenticated(request):
            return pages.redirect(request, pages.safe_next(request, next_page))
        return pages.render(
            request,
            "login.html",
            signed_in=False,
            next=pages.safe_next(request, next_page),
            error=None,
        )

    @public.post("/dashboard/login", name=f"{LOGIN}_post", response_class=HTMLResponse)
    async def login(
        request: Request,
        token: Annotated[str, Form()] = "",
        next_page: Annotated[str, Form(alias="next")] = "",
    ) -> Response:
        if not same_origin(request):
            return pages.cross_site(request)
        expected = auth.token(request)
        if expected is None:
            return pages.disabled(request)
        target = pages.safe_next(request, next_page)
        retry_after = auth.wrong_tokens.retry_after(request)
        if retry_after is not None:
            refused = pages.render(
                request,
                "login.html",
                status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                signed_in=False,
                next=target,
                error=f"{too_many_wrong_tokens(retry_after)}.",
            )
            refused.headers["Retry-After"] = str(retry_after)
            return refused
        if not token_matches(expected, token.strip()):
            auth.wrong_tokens.record(request)
            return pages.render(
                request,
                "login.html",
                status_code=status.HTTP_401_UNAUTHORIZED,
                signed_in=False,
                next=target,
                error="That is not the admin token (OUTBOX_ADMIN_TOKEN). Try again.",
            )
        response = pages.redirect(request, target)
        pages.start_session(request, response, expected)
        return response

    @protected.post("/dashboard/logout", name=LOGOUT)
    async def logout(request: Request, session: session_dep) -> Response:
        signed_in = auth(request)
        if signed_in is not None:  # a session cookie, not the bearer token
            await revoke(session, signed_in)
            try:
                await commit(session, "This session was not signed out")
            except NotCommitted as exc:
                # The cookie is kept: the session it holds was not ended, and still works.
                return pages.not_committed(request, "Not signed out", exc)
        response = pages.redirect(request, link(request, LOGIN), flash=("ok", "Signed out."))
        pages.end_session(request, response)
        return response

    # --- pages ------------------------------------------------------------------------------

    @protected.get("/dashboard", name=HOME, response_class=HTMLResponse)
    async def overview(request: Request, session: session_dep) -> Response:
        queues = await admin.queue_stats(session, window_seconds=STATS_WINDOW_SECONDS)
        workers = await admin.workers_alive(session, within_seconds=seen_within(request))
        totals = {state.value: 0 for state in JobState}
        for entry in queues:
            for state, count in entry.depth.items():
                totals[state] = totals.get(state, 0) + count
        return pages.render(
            request,
            "overview.html",
            refresh=REFRESH_SECONDS,
            queues=queues,
            workers=workers,
            totals=totals,
            oldest_due=max((entry.oldest_due_seconds for entry in queues if entry.due), default=0),
            window=format_duration(STATS_WINDOW_SECONDS),
            worker_window=format_duration(seen_within(request)),
        )

    @protected.get("/dashboard/jobs", name=JOBS, response_class=HTMLResponse)
    async def job_list(
        request: Request,
        session: session_dep,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        cursor: str | None = None,
    ) -> Response:
        filters = {"state": blank(state), "queue": blank(queue), "task": blank(task)}
        try:
            page = await admin.list_jobs(session, **filters, limit=PAGE_SIZE, cursor=blank(cursor))
        except InvalidRequest as exc:
            return pages.render(
                request,
                "jobs.html",
                status_code=status.HTTP_400_BAD_REQUEST,
                filters=filters,
                jobs=[],
                error=str(exc),
                next_url=None,
                first_url=None,
            )
        return pages.render(
            request,
            "jobs.html",
            filters=filters,
            jobs=page.items,
            error=None,
            next_url=(
                link(request, JOBS, {**filters, "cursor": page.next_cursor})
                if page.next_cursor
                else None
            ),
            first_url=link(request, JOBS, filters) if blank(cursor) else None,
        )

    @protected.get("/dashboard/jobs/{job_id}", name=JOB, response_class=HTMLResponse)
    async def job_page(request: Request, job_id: int, session: session_dep) -> Response:
        try:
            job = await admin.require_job(session, job_id)
        except JobNotFound as exc:
            return pages.message(
                request, status.HTTP_404_NOT_FOUND, "Job not found", str(exc), signed_in=True
            )
        return pages.render(request, "job.html", refresh=REFRESH_SECONDS, job=job)

    @protected.post("/dashboard/jobs/{job_id}/retry", name=RETRY)
    async def retry(request: Request, job_id: int, session: session_dep) -> Response:
        back = link(request, JOB, job_id=job_id)
        try:
            job = await admin.retry_job(session, job_id)
            await commit(session, f"Job {job_id} was not retried")
        except JobNotFound as exc:
            return pages.message(
                request, status.HTTP_404_NOT_FOUND, "Job not found", str(exc), signed_in=True
            )
        except JobStateConflict as exc:
            return pages.redirect(request, back, flash=("error", f"Not retried: {exc}."))
        except NotCommitted as exc:
            return pages.not_committed(request, "Not retried", exc)
        return pages.redirect(
            request,
            back,
            flash=(
                "ok",
                f"Job {job.id} is queued again (attempt {job.attempts + 1} "
                f"of at most {job.max_attempts}).",
            ),
        )

    @protected.post("/dashboard/jobs/{job_id}/cancel", name=CANCEL)
    async def cancel(request: Request, job_id: int, session: session_dep) -> Response:
        back = link(request, JOB, job_id=job_id)
        try:
            job = await admin.cancel_job(session, job_id)
            await commit(session, f"Job {job_id} was not cancelled")
        except JobNotFound as exc:
            return pages.message(
                request, status.HTTP_404_NOT_FOUND, "Job not found", str(exc), signed_in=True
            )
        except JobStateConflict as exc:
            return pages.redirect(request, back, flash=("error", f"Not cancelled: {exc}."))
        except NotCommitted as exc:
            return pages.not_committed(request, "Not cancelled", exc)
        if job.state == JobState.CANCELLED:
            text = f"Job {job.id} is cancelled."
        else:
            text = (
                f"Job {job.id} is running: its worker was asked to stop it and will mark it "
                "cancelled at its next heartbeat."
            )
        return pages.redirect(request, back, flash=("ok", text))

    router = APIRouter()
    router.include_router(public)
    router.include_router(protected)
    return router
