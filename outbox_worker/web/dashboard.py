"""The dashboard: small server-rendered pages under ``/dashboard``, over the same admin
service as the JSON routes and the CLI (:mod:`outbox_worker.admin`,
:mod:`outbox_worker.queue_settings`), so the faces agree.

- ``/dashboard``: queues (depth by state, age of the oldest due job, their settings in short,
  pause, with Pause and Resume) and the workers alive.
- ``/dashboard/queues/{queue}``: one queue's settings, one form that changes them all at
  once, and Pause or Resume. It never refreshes itself, so nothing typed there is lost.
- ``/dashboard/jobs``: the job list, filtered by state, queue and task, a page at a time.
- ``/dashboard/jobs/{id}``: one job, with Retry and Cancel.

Retry, Cancel, the queue settings and signing out commit their change before they flash it
as done (as the JSON routes do, :func:`outbox_worker.web.router.commit`); a change the
database refuses to commit is a 500 page that says so.

Every page but the login page needs a signed-in session, and every POST must come from a page
of this site: :mod:`outbox_worker.web.dashboard_access`. How the pages render and flash:
:mod:`outbox_worker.web.dashboard_pages`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response, status
from fastapi.responses import HTMLResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData

from outbox_worker import admin, queue_settings
from outbox_worker.errors import InvalidRequest, JobNotFound, JobStateConflict
from outbox_worker.formatting import format_duration
from outbox_worker.jobs import Job, JobState
from outbox_worker.names import is_valid_name
from outbox_worker.queue_settings import (
    MAX_CONCURRENCY,
    MAX_RATE_PERIOD,
    MAX_REASON_LENGTH,
    QueueSettings,
)
from outbox_worker.web.auth import AdminAuth
from outbox_worker.web.dashboard_access import (
    Dashboard,
    DashboardDep,
    SessionDep,
    login,
    login_form,
    logout,
    protected_route,
    signed_in_session,
)
from outbox_worker.web.dashboard_pages import (
    CANCEL,
    FLASH_COOKIE,
    HOME,
    JOB,
    JOBS,
    LOGIN,
    LOGOUT,
    QUEUE,
    QUEUE_PAUSE,
    QUEUE_RESUME,
    QUEUE_SETTINGS,
    RETRY,
    decode_flash,
    home,
    link,
    message,
    not_committed,
    redirect,
    render,
)
from outbox_worker.web.router import NotCommitted, SessionProvider, commit

# Importable from here, where they were first.
__all__ = ["FLASH_COOKIE", "create_dashboard_router", "decode_flash", "format_duration"]

REFRESH_SECONDS = 5
PAGE_SIZE = 50
STATS_WINDOW_SECONDS = 300.0


def blank(value: str | None) -> str | None:
    """An empty form field is no filter."""
    value = (value or "").strip()
    return value or None


def job_not_found(request: Request, exc: JobNotFound) -> HTMLResponse:
    return message(request, status.HTTP_404_NOT_FOUND, "Job not found", str(exc), signed_in=True)


# --- pages ----------------------------------------------------------------------------------


async def overview(request: Request, dashboard: DashboardDep, session: SessionDep) -> Response:
    seen_within = dashboard.seen_within(request)
    views = await queue_settings.queue_views(session, window_seconds=STATS_WINDOW_SECONDS)
    queues = [view.stats for view in views]
    workers = await admin.workers_alive(session, within_seconds=seen_within)
    schedules = await admin.list_schedules(session)
    totals = {state.value: 0 for state in JobState}
    for entry in queues:
        for state, count in entry.depth.items():
            totals[state] = totals.get(state, 0) + count
    return render(
        request,
        "overview.html",
        refresh=REFRESH_SECONDS,
        queues=queues,
        settings={view.stats.queue: view.settings for view in views},
        workers=workers,
        schedules=schedules,
        totals=totals,
        oldest_due=max((entry.oldest_due_seconds for entry in queues if entry.due), default=0),
        window=format_duration(STATS_WINDOW_SECONDS),
        worker_window=format_duration(seen_within),
    )


async def job_list(
    request: Request,
    session: SessionDep,
    state: str | None = None,
    queue: str | None = None,
    task: str | None = None,
    cursor: str | None = None,
    tag: str | None = None,
) -> Response:
    filters = {
        "state": blank(state),
        "queue": blank(queue),
        "task": blank(task),
        "tag": blank(tag),
    }
    try:
        page = await admin.list_jobs(session, **filters, limit=PAGE_SIZE, cursor=blank(cursor))
    except InvalidRequest as exc:
        return render(
            request,
            "jobs.html",
            status_code=status.HTTP_400_BAD_REQUEST,
            filters=filters,
            jobs=[],
            error=str(exc),
            next_url=None,
            first_url=None,
        )
    return render(
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


async def job_page(request: Request, job_id: int, session: SessionDep) -> Response:
    try:
        job = await admin.require_job(session, job_id)
    except JobNotFound as exc:
        return job_not_found(request, exc)
    return render(request, "job.html", refresh=REFRESH_SECONDS, job=job)


# --- Retry and Cancel -----------------------------------------------------------------------


async def change_job(
    request: Request,
    session: AsyncSession,
    job_id: int,
    change: Callable[[AsyncSession, int], Awaitable[Job]],
    done: str,
    outcome: Callable[[Job], str],
) -> Response:
    """Retry and Cancel: ``change`` committed, then back to the job's page, flashing
    ``outcome`` of the changed job, or why it was not ``done``."""
    back = link(request, JOB, job_id=job_id)
    try:
        job = await change(session, job_id)
        await commit(session, f"Job {job_id} was not {done}")
    except JobNotFound as exc:
        return job_not_found(request, exc)
    except JobStateConflict as exc:
        return redirect(request, back, flash=("error", f"Not {done}: {exc}."))
    except NotCommitted as exc:
        return not_committed(request, f"Not {done}", exc)
    return redirect(request, back, flash=("ok", outcome(job)))


def queued_again(job: Job) -> str:
    return (
        f"Job {job.id} is queued again (attempt {job.attempts + 1} of at most {job.max_attempts})."
    )


def cancelled(job: Job) -> str:
    if job.state == JobState.CANCELLED:
        return f"Job {job.id} is cancelled."
    return (
        f"Job {job.id} is running: its worker was asked to stop it and will mark it "
        "cancelled at its next heartbeat."
    )


async def retry(request: Request, job_id: int, session: SessionDep) -> Response:
    return await change_job(request, session, job_id, admin.retry_job, "retried", queued_again)


async def cancel(request: Request, job_id: int, session: SessionDep) -> Response:
    return await change_job(request, session, job_id, admin.cancel_job, "cancelled", cancelled)


# --- the queue settings ---------------------------------------------------------------------


# A window in seconds as typed (and as_typed shows it): ASCII digits, where float() would
# also read "1e9", "inf", "nan" and other scripts' digits; at most a day's worth before the point.
SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,12})?")


def queue_page_of(request: Request, queue: str) -> str:
    """A queue's settings page; the overview for a name no queue can have."""
    return link(request, QUEUE, queue=queue) if is_valid_name(queue) else home(request)


async def change_queue(
    request: Request,
    session: AsyncSession,
    queue: str,
    change: Callable[[], Awaitable[QueueSettings]],
    done: str,
    outcome: Callable[[QueueSettings], str],
    back: str,
) -> Response:
    """Pause, Resume and the settings: ``change`` committed, then back to ``back``, flashing
    ``outcome`` of the new settings, or why they were not ``done``. Then nothing changed: what
    ``change`` wrote before a value was refused is rolled back, before an app's dependency
    that commits on the way out can commit it."""
    try:
        settings = await change()
        await commit(session, f"Queue {queue} was not {done}")
    except InvalidRequest as exc:
        await session.rollback()
        return redirect(request, back, flash=("error", f"Not {done}: {exc}."))
    except NotCommitted as exc:
        return not_committed(request, f"Not {done}", exc)
    return redirect(request, back, flash=("ok", outcome(settings)))


# The settings form's fields are named as the admin API names the settings (and so as the
# errors name them). It is read as sent (request.form()), not through FastAPI's Form(),
# which takes an empty field for one not sent: empty is none, not sent leaves the setting.


def changed_fields(form: FormData) -> dict[str, str]:
    """The fields the operator changed. The page sends beside each field what it showed
    (``shown_`` and the field's name); a field that still holds it counts as not sent, so
    that a setting changed elsewhere since the page was loaded (by the CLI, the API, SQL or
    another operator) keeps that change. A form without them (a script's) sends them all."""
    fields = {name: str(value) for name, value in form.items() if not name.startswith("shown_")}
    return {
        name: value
        for name, value in fields.items()
        if form.get(f"shown_{name}") is None or str(form[f"shown_{name}"]) != value
    }


def whole_number(form: Mapping[str, str], field: str, current: int | None) -> int | None:
    """A limit as its field holds it: empty is none, not sent is ``current``. Read as ASCII
    digits, no more than the largest limit has: int() would also read fullwidth digits, and
    thousands of them. The range is the service's to check."""
    sent = form.get(field)
    if sent is None:
        return current
    value = sent.strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(MAX_CONCURRENCY)):
        raise InvalidRequest(
            f"{field} must be a whole number from 1 to {MAX_CONCURRENCY}, or empty for none; "
            f"got {value[:40]!r}"
        )
    return int(value)


def seconds(form: Mapping[str, str], field: str, current: float) -> float:
    """A rate's window as its field holds it, in seconds: empty is one second (the default),
    not sent is ``current``. The range is the service's to check."""
    sent = form.get(field)
    if sent is None:
        return current
    value = sent.strip()
    if not value:
        return 1.0
    if not SECONDS.fullmatch(value):
        raise InvalidRequest(
            f"{field} must be a number of seconds, more than 0 and at most {MAX_RATE_PERIOD}; "
            f"got {value[:40]!r}"
        )
    return float(value)


def paused(settings: QueueSettings) -> str:
    return (
        f"Queue {settings.name} is paused: none of its jobs start until it is resumed "
        "(those running finish)."
    )


def resumed(settings: QueueSettings) -> str:
    return f"Queue {settings.name} is resumed: its jobs start again."


def in_force(settings: QueueSettings) -> str:
    return f"Queue {settings.name}: {settings.describe()}."


def returning(request: Request, queue: str, back: str) -> str:
    """Where Pause and Resume go back to: the page their button was on."""
    return queue_page_of(request, queue) if back == "queue" else home(request)


async def queue_page(request: Request, queue: str, session: SessionDep) -> Response:
    try:
        settings = await queue_settings.get_settings(session, queue)
    except InvalidRequest as exc:
        return message(
            request, status.HTTP_404_NOT_FOUND, "No such queue", str(exc), signed_in=True
        )
    return render(
        request,
        "queue.html",
        settings=settings,
        max_concurrency=MAX_CONCURRENCY,
        max_period=MAX_RATE_PERIOD,
        max_reason=MAX_REASON_LENGTH,
    )


async def pause_queue(
    request: Request,
    queue: str,
    session: SessionDep,
    reason: Annotated[str, Form()] = "",
    back: Annotated[str, Form()] = "",
) -> Response:
    async def change() -> QueueSettings:
        return await queue_settings.pause(session, queue, reason=blank(reason))

    return await change_queue(
        request, session, queue, change, "paused", paused, returning(request, queue, back)
    )


async def resume_queue(
    request: Request, queue: str, session: SessionDep, back: Annotated[str, Form()] = ""
) -> Response:
    async def change() -> QueueSettings:
        return await queue_settings.resume(session, queue)

    return await change_queue(
        request, session, queue, change, "resumed", resumed, returning(request, queue, back)
    )


async def set_queue_settings(request: Request, queue: str, session: SessionDep) -> Response:
    form = changed_fields(await request.form())

    async def change() -> QueueSettings:
        # Every field is read before the first write, and change_queue rolls back the writes
        # before a value the service refuses: the form changes all its settings or none.
        now = await queue_settings.get_settings(session, queue)
        concurrency = whole_number(form, "concurrency", now.concurrency)
        key_concurrency = whole_number(form, "key_concurrency", now.key_concurrency)
        rate = (
            whole_number(form, "rate_limit", now.rate_limit),
            seconds(form, "rate_period", now.rate_period),
        )
        key_rate = (
            whole_number(form, "key_rate_limit", now.key_rate_limit),
            seconds(form, "key_rate_period", now.key_rate_period),
        )
        breaker = whole_number(form, "breaker_threshold", now.breaker_threshold)
        await queue_settings.set_concurrency(session, queue, concurrency)
        await queue_settings.set_key_concurrency(session, queue, key_concurrency)
        await queue_settings.set_rate(session, queue, *rate)
        await queue_settings.set_key_rate(session, queue, *key_rate)
        return await queue_settings.set_breaker(session, queue, breaker)

    return await change_queue(
        request, session, queue, change, "changed", in_force, queue_page_of(request, queue)
    )


# --- the router -----------------------------------------------------------------------------


def create_dashboard_router(
    *,
    get_session: SessionProvider,
    auth: AdminAuth,
    worker_seen_within_seconds: float | Callable[[Request], float] = 60.0,
) -> APIRouter:
    """The dashboard's pages; ``create_admin_router`` includes them next to the JSON routes."""
    dashboard = Dashboard(auth, worker_seen_within_seconds)
    public = APIRouter(tags=["dashboard"], include_in_schema=False)
    public.get("/dashboard/login", name=LOGIN, response_class=HTMLResponse)(login_form)
    public.post("/dashboard/login", name=f"{LOGIN}_post", response_class=HTMLResponse)(login)
    protected = APIRouter(
        tags=["dashboard"],
        include_in_schema=False,
        route_class=protected_route(auth),
        dependencies=[Depends(signed_in_session(get_session, auth))],
    )
    protected.post("/dashboard/logout", name=LOGOUT)(logout)
    protected.get("/dashboard", name=HOME, response_class=HTMLResponse)(overview)
    protected.get("/dashboard/jobs", name=JOBS, response_class=HTMLResponse)(job_list)
    protected.get("/dashboard/jobs/{job_id}", name=JOB, response_class=HTMLResponse)(job_page)
    protected.post("/dashboard/jobs/{job_id}/retry", name=RETRY)(retry)
    protected.post("/dashboard/jobs/{job_id}/cancel", name=CANCEL)(cancel)
    protected.get("/dashboard/queues/{queue}", name=QUEUE, response_class=HTMLResponse)(queue_page)
    protected.post("/dashboard/queues/{queue}/settings", name=QUEUE_SETTINGS)(set_queue_settings)
    protected.post("/dashboard/queues/{queue}/pause", name=QUEUE_PAUSE)(pause_queue)
    protected.post("/dashboard/queues/{queue}/resume", name=QUEUE_RESUME)(resume_queue)

    router = APIRouter(dependencies=[Depends(dashboard.enter)])
    router.include_router(public)
    router.include_router(protected)
    return router
