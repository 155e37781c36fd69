"""The dashboard: small server-rendered pages under ``/dashboard``, over the same admin
service as the JSON routes and the CLI (:mod:`outbox_worker.admin`), so the faces agree.

- ``/dashboard``: queues (depth by state, age of the oldest due job) and the workers alive.
- ``/dashboard/jobs``: the job list, filtered by state, queue and task, a page at a time.
- ``/dashboard/jobs/{id}``: one job, with Retry and Cancel.

Retry, Cancel and signing out commit their change before they flash it as done (as the JSON
routes do, :func:`outbox_worker.web.router.commit`); a change the database refuses to commit
is a 500 page that says so.

Every page but the login page needs a signed-in session, and every POST must come from a page
of this site: :mod:`outbox_worker.web.dashboard_access`. How the pages render and flash:
:mod:`outbox_worker.web.dashboard_pages`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import HTMLResponse
from sqlalchemy.ext.asyncio import AsyncSession

from outbox_worker import admin
from outbox_worker.errors import InvalidRequest, JobNotFound, JobStateConflict
from outbox_worker.formatting import format_duration
from outbox_worker.jobs import Job, JobState
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
    RETRY,
    decode_flash,
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
    queues = await admin.queue_stats(session, window_seconds=STATS_WINDOW_SECONDS)
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

    router = APIRouter(dependencies=[Depends(dashboard.enter)])
    router.include_router(public)
    router.include_router(protected)
    return router
