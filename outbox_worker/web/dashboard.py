"""The dashboard: small server-rendered pages under ``/dashboard``, over the same admin
service as the JSON routes and the CLI (:mod:`outbox_worker.admin`,
:mod:`outbox_worker.queue_settings`), so the faces agree.

- ``/dashboard``: queues (depth by state, age of the oldest due job, limit, pause, with
  Pause, Resume and a form for the limit) and the workers alive.
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

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response, status
from fastapi.responses import HTMLResponse
from sqlalchemy.ext.asyncio import AsyncSession

from outbox_worker import admin, queue_settings
from outbox_worker.errors import InvalidRequest, JobNotFound, JobStateConflict
from outbox_worker.formatting import format_duration
from outbox_worker.jobs import Job, JobState
from outbox_worker.queue_settings import MAX_CONCURRENCY, QueueSettings
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
    QUEUE_LIMIT,
    QUEUE_PAUSE,
    QUEUE_RESUME,
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
        max_concurrency=MAX_CONCURRENCY,
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


async def change_queue(
    request: Request,
    session: AsyncSession,
    queue: str,
    change: Callable[[], Awaitable[QueueSettings]],
    done: str,
    outcome: Callable[[QueueSettings], str],
) -> Response:
    """Pause, Resume and the limit: ``change`` committed, then back to the overview, flashing
    ``outcome`` of the new settings, or why they were not ``done`` (nothing changed)."""
    try:
        settings = await change()
        await commit(session, f"Queue {queue} was not {done}")
    except InvalidRequest as exc:
        return redirect(request, home(request), flash=("error", f"Not {done}: {exc}."))
    except NotCommitted as exc:
        return not_committed(request, f"Not {done}", exc)
    return redirect(request, home(request), flash=("ok", outcome(settings)))


def concurrency_limit(value: str) -> int | None:
    """The limit a form field holds; empty is no limit. Read as ASCII digits, no more than the
    largest limit has: int() would also read fullwidth digits, and thousands of them."""
    value = value.strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(MAX_CONCURRENCY)):
        raise InvalidRequest(
            f"the limit must be a whole number from 1 to {MAX_CONCURRENCY}, or empty for no "
            f"limit; got {value[:40]!r}"
        )
    return int(value)


def paused(settings: QueueSettings) -> str:
    return (
        f"Queue {settings.name} is paused: none of its jobs start until it is resumed "
        "(those running finish)."
    )


def resumed(settings: QueueSettings) -> str:
    return f"Queue {settings.name} is resumed: its jobs start again."


def limited(settings: QueueSettings) -> str:
    if settings.concurrency is None:
        return f"Queue {settings.name} has no limit on how many of its jobs run at once."
    return f"Queue {settings.name} runs at most {settings.concurrency} jobs at once."


async def pause_queue(request: Request, queue: str, session: SessionDep) -> Response:
    return await change_queue(
        request, session, queue, lambda: queue_settings.pause(session, queue), "paused", paused
    )


async def resume_queue(request: Request, queue: str, session: SessionDep) -> Response:
    return await change_queue(
        request, session, queue, lambda: queue_settings.resume(session, queue), "resumed", resumed
    )


async def limit_queue(
    request: Request,
    queue: str,
    session: SessionDep,
    concurrency: Annotated[str, Form()] = "",
) -> Response:
    async def change() -> QueueSettings:
        return await queue_settings.set_concurrency(session, queue, concurrency_limit(concurrency))

    return await change_queue(request, session, queue, change, "changed", limited)


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
    protected.post("/dashboard/queues/{queue}/pause", name=QUEUE_PAUSE)(pause_queue)
    protected.post("/dashboard/queues/{queue}/resume", name=QUEUE_RESUME)(resume_queue)
    protected.post("/dashboard/queues/{queue}/limit", name=QUEUE_LIMIT)(limit_queue)

    router = APIRouter(dependencies=[Depends(dashboard.enter)])
    router.include_router(public)
    router.include_router(protected)
    return router
