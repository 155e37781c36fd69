"""The admin routes (and the dashboard), as one router any FastAPI app mounts.

Every route goes through :mod:`outbox_worker.admin` (queue settings through
:mod:`outbox_worker.queue_settings`), as the CLI does, and runs in the transaction of the
session dependency the app provides. The routes that change jobs or queue settings commit
that transaction themselves before they answer (see :func:`commit`): a 2xx means the change
is in the database.
"""

# No `from __future__ import annotations` here: the routes' annotations name a dependency
# built inside create_admin_router, which FastAPI can only see if they are evaluated eagerly.
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any, Self

import asyncpg
from fastapi import (
    APIRouter,
    Body,
    Depends,
    FastAPI,
    HTTPException,
    Query,
    Request,
    Response,
    status,
)
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException as StarletteHTTPException

from outbox_worker import admin, queue_settings
from outbox_worker.db import is_database_unavailable
from outbox_worker.errors import InvalidRequest, JobNotFound, JobStateConflict, OutboxError
from outbox_worker.jobs import Job, JobOut
from outbox_worker.queue_settings import (
    MAX_CONCURRENCY,
    MAX_RATE_PERIOD,
    MAX_REASON_LENGTH,
    QueueSettings,
)
from outbox_worker.web.auth import AdminAuth, TokenSource

SessionProvider = Callable[..., AsyncIterator[AsyncSession]]


class JobPageOut(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class QueueSettingsOut(BaseModel):
    queue: str
    concurrency: int | None
    key_concurrency: int | None
    rate_limit: int | None
    rate_period: float
    key_rate_limit: int | None
    key_rate_period: float
    breaker_threshold: int | None
    paused: bool
    paused_at: str | None
    paused_by: str | None
    pause_reason: str | None
    updated_at: str | None

    @classmethod
    def of(cls, settings: QueueSettings) -> Self:
        return cls(**settings.as_dict())


class QueueOut(BaseModel):
    queue: str
    depth: dict[str, int]
    due: int
    oldest_due_seconds: float
    finished_recently: dict[str, int]
    settings: QueueSettingsOut


class QueuesOut(BaseModel):
    queues: list[QueueOut]
    window_seconds: float


class ScheduleOut(BaseModel):
    name: str
    task: str
    queue: str
    cron: str
    timezone: str
    missed: str
    grace_seconds: float
    args: dict[str, Any]
    last_tick: str
    next_tick: str
    last_job_id: int | None
    last_job_state: str | None
    declared_at: str
    overdue_seconds: float


class SchedulesOut(BaseModel):
    schedules: list[ScheduleOut]


class RetriedOut(BaseModel):
    retried: list[int]


class QueueSettingsIn(BaseModel):
    """Strict: a limit of ``true``, ``2.5`` or ``"3"`` is a client's mistake, not a 1, 2 or 3.
    A field left out is left as it is; at least one must be given."""

    model_config = ConfigDict(extra="forbid", strict=True)

    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] | None = Field(
        default=None,
        description="at most this many of the queue's jobs run at once; null: no limit",
    )
    key_concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] | None = Field(
        default=None,
        description="at most this many jobs of one concurrency key run at once, the keys "
        "served in turn; null: no limit per key",
    )
    rate_limit: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] | None = Field(
        default=None,
        description="at most this many of the queue's jobs start in any window of "
        "rate_period seconds; null: no rate limit",
    )
    rate_period: Annotated[float, Field(gt=0, le=MAX_RATE_PERIOD, allow_inf_nan=False)] = Field(
        default=1.0, description="the rate limit's window, in seconds"
    )
    key_rate_limit: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] | None = Field(
        default=None,
        description="at most this many jobs of one concurrency key start in any window of "
        "key_rate_period seconds, the other keys going on; null: no rate limit per key",
    )
    key_rate_period: Annotated[float, Field(gt=0, le=MAX_RATE_PERIOD, allow_inf_nan=False)] = Field(
        default=1.0, description="the rate limit per key's window, in seconds"
    )
    breaker_threshold: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] | None = Field(
        default=None,
        description="pause the queue once one of its tasks fails this many attempts in a "
        "row; null: no breaker",
    )

    @model_validator(mode="after")
    def something_to_set(self) -> Self:
        if not self.model_fields_set:
            raise ValueError(
                "give concurrency, key_concurrency, rate_limit, key_rate_limit, "
                "breaker_threshold or several"
            )
        return self


class PauseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: Annotated[str, Field(max_length=MAX_REASON_LENGTH)] | None = None


class NotCommitted(OutboxError):
    """The database refused to commit an admin change: nothing changed."""


async def commit(session: AsyncSession, failure: str) -> None:
    """Commit the change a route made, before it is answered as done.

    The route commits, not the app's dependency, because a dependency that yields a plain
    session (``async with SessionLocal() as s: yield s``) never commits: the change would be
    answered as done, then rolled back when the session closes. A dependency that opened the
    transaction itself (``session.begin()``) finds it ended on the way out, so this stays the
    request's one commit. A refusal (a deferred constraint, a trigger, a serialization
    failure) raises :class:`NotCommitted`, which starts with ``failure``; a database outage
    goes on as it came, for the outage handling to answer.
    """
    try:
        await session.commit()
    except Exception as exc:
        if is_database_unavailable(exc):
            raise
        raise NotCommitted(
            f"{failure}: the database refused to commit the change ({_reason(exc)})"
        ) from exc


def _reason(exc: BaseException) -> str:
    """The driver's own words, on one line: SQLAlchemy's wrapper adds the statement and a
    link, and asyncpg's error is the innermost cause."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def http_error(exc: OutboxError) -> HTTPException:
    """The library's errors as the client's 4xx (a refused commit is a 500): one
    translation, here."""
    if isinstance(exc, NotCommitted):
        return HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc))
    if isinstance(exc, JobNotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    if isinstance(exc, JobStateConflict):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    if isinstance(exc, InvalidRequest):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))
    return HTTPException(status.HTTP_400_BAD_REQUEST, str(exc))


async def guarded(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except OutboxError as exc:
        raise http_error(exc) from exc


async def change_job(
    session: AsyncSession,
    job_id: int,
    change: Callable[[AsyncSession, int], Awaitable[Job]],
    done: str,
) -> JobOut:
    """Retry and Cancel: ``change`` committed before it is answered."""
    job = await guarded(change(session, job_id))
    await guarded(commit(session, f"job {job_id} was not {done}"))
    return JobOut.of(job)


async def change_queue(
    session: AsyncSession, change: Awaitable[QueueSettings], failure: str
) -> QueueSettingsOut:
    """A queue's settings: ``change`` committed before it is answered."""
    settings = await guarded(change)
    await guarded(commit(session, failure))
    return QueueSettingsOut.of(settings)


# How long an answer to a database outage tells the client to wait before trying again.
RETRY_AFTER_SECONDS = 5
# The classes an outage arrives as, for the exception handlers that must name them.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)
NO_STORE = {"Cache-Control": "no-store"}
OUTAGE_DETAIL = "the database is unavailable; try again shortly"
OUTAGE_HEADERS = {"Retry-After": str(RETRY_AFTER_SECONDS)}


class AdminRoute(APIRoute):
    """Every answer of the JSON routes, errors included, says no-store: jobs carry arguments
    and errors that no browser or proxy should keep. A database outage is a 503 with
    Retry-After. Errors of the route go on as HTTPException rather than as an answer returned
    here, so that the session dependency still sees them and rolls back."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                response = await handler(request)
            except StarletteHTTPException as exc:
                exc.headers = {**(exc.headers or {}), **NO_STORE}
                raise
            except RequestValidationError as exc:
                # Raised before the route ran: the app's own answer to it (which may shape
                # the detail), answered here to add no-store to it.
                handle = request.app.exception_handlers.get(
                    RequestValidationError, request_validation_exception_handler
                )
                response = handle(request, exc)
                if inspect.isawaitable(response):
                    response = await response
            except Exception as exc:
                if not is_database_unavailable(exc):
                    raise
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    OUTAGE_DETAIL,
                    {**NO_STORE, **OUTAGE_HEADERS},
                ) from exc
            response.headers.update(NO_STORE)
            return response

        return answer


async def answer_database_outage(request: Request, exc: Exception) -> Response:
    """An exception handler: a database outage is a 503 with Retry-After; any other error
    goes on to the app's own handling of unexpected errors."""
    if not is_database_unavailable(exc):
        raise exc
    return JSONResponse(
        {"detail": OUTAGE_DETAIL},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers=OUTAGE_HEADERS,
    )


def handle_database_outages(app: FastAPI) -> None:
    """Make every route of ``app`` answer a database outage with 503 and Retry-After, not
    500: a handler for each class an outage arrives as, so routes need no change."""
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, answer_database_outage)


def create_admin_router(
    *,
    get_session: SessionProvider,
    admin_token: TokenSource,
    include_dashboard: bool = True,
    worker_seen_within_seconds: float | Callable[[Request], float] = 60.0,
) -> APIRouter:
    """``get_session`` is the app's dependency that yields a session, inside a transaction
    it opened or not: the routes that change jobs commit it themselves. ``admin_token`` is
    the token, or a function of the request that returns it."""
    auth = AdminAuth(admin_token)
    session_dep = Annotated[AsyncSession, Depends(get_session, scope="function")]
    router = APIRouter(tags=["admin"])
    protected = APIRouter(dependencies=[Depends(auth)], route_class=AdminRoute)

    @protected.get("/jobs")
    async def list_jobs(
        session: session_dep,
        state: Annotated[str | None, Query(description="queued, running, succeeded, …")] = None,
        queue: str | None = None,
        task: str | None = None,
        limit: Annotated[int, Query(ge=1, le=admin.MAX_PAGE)] = 50,
        cursor: str | None = None,
        tag: Annotated[str | None, Query(description="only jobs with this tag")] = None,
        concurrency_key: Annotated[
            str | None, Query(description="only jobs with this concurrency key")
        ] = None,
    ) -> JobPageOut:
        page = await guarded(
            admin.list_jobs(
                session,
                state=state,
                queue=queue,
                task=task,
                limit=limit,
                cursor=cursor,
                tag=tag,
                concurrency_key=concurrency_key,
            )
        )
        return JobPageOut(
            items=[JobOut.of(job) for job in page.items], next_cursor=page.next_cursor
        )

    @protected.get("/jobs/{job_id}")
    async def show_job(job_id: int, session: session_dep) -> JobOut:
        return JobOut.of(await guarded(admin.require_job(session, job_id)))

    @protected.post("/jobs/retry-dead")
    async def retry_dead(
        session: session_dep, queue: str | None = None, task: str | None = None
    ) -> RetriedOut:
        """Every dead job matching the filters back to queued."""
        retried = await guarded(admin.retry_dead_jobs(session, queue=queue, task=task))
        await guarded(commit(session, "the dead jobs were not retried"))
        return RetriedOut(retried=retried)

    @protected.post("/jobs/{job_id}/retry")
    async def retry_job(job_id: int, session: session_dep) -> JobOut:
        return await change_job(session, job_id, admin.retry_job, "retried")

    @protected.post("/jobs/{job_id}/cancel")
    async def cancel_job(job_id: int, session: session_dep) -> JobOut:
        return await change_job(session, job_id, admin.cancel_job, "cancelled")

    @protected.get("/queues")
    async def queues(
        session: session_dep,
        window_seconds: Annotated[float, Query(gt=0, le=86400)] = 300.0,
    ) -> QueuesOut:
        """Every queue with jobs or settings: its numbers, and its limit and pause."""
        views = await queue_settings.queue_views(session, window_seconds=window_seconds)
        return QueuesOut(
            queues=[
                QueueOut(**view.stats.as_dict(), settings=QueueSettingsOut.of(view.settings))
                for view in views
            ],
            window_seconds=window_seconds,
        )

    @protected.get("/queues/{name}/settings")
    async def show_queue_settings(name: str, session: session_dep) -> QueueSettingsOut:
        """A queue without settings has the defaults: no limit, not paused."""
        return QueueSettingsOut.of(await guarded(queue_settings.get_settings(session, name)))

    @protected.patch("/queues/{name}/settings")
    async def set_queue_settings(
        name: str, body: QueueSettingsIn, session: session_dep
    ) -> QueueSettingsOut:
        async def change() -> QueueSettings:
            settings = await queue_settings.get_settings(session, name)
            if "concurrency" in body.model_fields_set:
                settings = await queue_settings.set_concurrency(session, name, body.concurrency)
            if "key_concurrency" in body.model_fields_set:
                settings = await queue_settings.set_key_concurrency(
                    session, name, body.key_concurrency
                )
            given = body.model_fields_set
            if given & {"rate_limit", "rate_period"}:
                settings = await queue_settings.set_rate(
                    session,
                    name,
                    body.rate_limit if "rate_limit" in given else settings.rate_limit,
                    body.rate_period if "rate_period" in given else settings.rate_period,
                )
            if given & {"key_rate_limit", "key_rate_period"}:
                settings = await queue_settings.set_key_rate(
                    session,
                    name,
                    body.key_rate_limit if "key_rate_limit" in given else settings.key_rate_limit,
                    body.key_rate_period
                    if "key_rate_period" in given
                    else settings.key_rate_period,
                )
            if "breaker_threshold" in body.model_fields_set:
                settings = await queue_settings.set_breaker(session, name, body.breaker_threshold)
            return settings

        return await change_queue(session, change(), f"the settings of queue {name} were not set")

    @protected.post("/queues/{name}/pause")
    async def pause_queue(
        name: str, session: session_dep, body: Annotated[PauseIn | None, Body()] = None
    ) -> QueueSettingsOut:
        """No job of the queue starts until it is resumed; running jobs finish."""
        reason = None if body is None else body.reason
        change = queue_settings.pause(session, name, reason=reason, by="operator")
        return await change_queue(session, change, f"queue {name} was not paused")

    @protected.post("/queues/{name}/resume")
    async def resume_queue(name: str, session: session_dep) -> QueueSettingsOut:
        change = queue_settings.resume(session, name)
        return await change_queue(session, change, f"queue {name} was not resumed")

    @protected.get("/schedules")
    async def schedules(session: session_dep) -> SchedulesOut:
        """Periodic jobs: definition, last tick and its job, next tick, how overdue."""
        found = await admin.list_schedules(session)
        return SchedulesOut(schedules=[ScheduleOut(**entry.as_dict()) for entry in found])

    router.include_router(protected)
    if include_dashboard:
        from outbox_worker.web.dashboard import create_dashboard_router

        router.include_router(
            create_dashboard_router(
                get_session=get_session,
                auth=AdminAuth(admin_token, accept_cookie=True),
                worker_seen_within_seconds=worker_seen_within_seconds,
            )
        )
    return router
