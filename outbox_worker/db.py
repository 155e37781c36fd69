"""The worker's asyncpg pool, and the one place that judges database errors: which ones to
retry, and which ones an operator must act on (translated into the library's errors).

The unit retried is a whole transaction (here, a single autocommit statement, or a callable
that owns its transaction), never a statement inside one: after an error, the statements
before it in the same transaction are gone too.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    stop_when_event_set,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from outbox_worker.config import sqlalchemy_url
from outbox_worker.errors import ConfigError, DatabaseUnavailable, OutboxError
from outbox_worker.formatting import error_line, one_line

T = TypeVar("T")

# How long one connection attempt may take before it counts as failed (and is retried).
CONNECT_TIMEOUT_SECONDS = 10.0

log = structlog.get_logger("outbox_worker.db")

_TRANSIENT = (
    asyncpg.PostgresConnectionError,  # class 08: the connection broke or was refused
    asyncpg.exceptions.OperatorInterventionError,  # 57P0x: shutdown, restart, terminated
    asyncpg.exceptions.TransactionRollbackError,  # 40001 serialisation, 40P01 deadlock
    asyncpg.exceptions.TooManyConnectionsError,
    # A connection broken mid-operation (terminated backend, server restart) can fail its
    # reset on release with this; the pool has dropped it, and the next try gets a new one.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """True for errors after which the same transaction may well succeed if run again."""
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


async def _end_open_transaction(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(
    dsn: str,
    *,
    size: int,
    prepared_statements: bool,
    session_state: bool = True,
) -> asyncpg.Pool:
    """A pool that is usable even when the server is not up yet: it connects lazily.

    ``session_state=False`` is for the worker's own statements, which never SET, LISTEN or
    take session locks: releasing a connection then costs no round trip, where asyncpg's
    default reset sends one (``RESET ALL``, ``UNLISTEN *``, …) on every release.
    """
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=size,
        # 0 turns asyncpg's per-connection prepared statement cache off: needed behind
        # PgBouncer in transaction mode, where each transaction may get another server
        # connection, which never saw the statement prepared.
        statement_cache_size=1024 if prepared_statements else 0,
        timeout=CONNECT_TIMEOUT_SECONDS,
        max_inactive_connection_lifetime=300,
        reset=None if session_state else _end_open_transaction,
    )


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "database_retry",
            unit=what,
            attempt=state.attempt_number,
            error=error_line(exc) if exc is not None else None,
            sleep=round(state.upcoming_sleep, 3),
        )

    return before_sleep


async def retrying(
    what: str,
    unit: Callable[[], Awaitable[T]],
    *,
    give_up_after: float | None = None,
    until: asyncio.Event | None = None,
) -> T:
    """Run ``unit`` until it succeeds, retrying transient database errors with backoff.

    By default it retries for as long as it takes: a worker outlives a database restart
    instead of dying with it. ``give_up_after`` bounds that in seconds; ``until`` ends it
    when the event is set (a worker told to stop).
    """
    try:
        return await unit()
    except Exception as exc:
        if not is_transient(exc):
            raise
    # Only a unit that failed on the database pays for the retrying machinery: its first
    # retry is at once, as a fresh connection from the pool usually answers.
    stop: stop_base = stop_never if give_up_after is None else stop_after_delay(give_up_after)
    if until is not None:
        stop = stop | stop_when_event_set(until)  # type: ignore[arg-type]
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=0.05, max=2.0),
        stop=stop,
        before_sleep=_log_retry(what),
        reraise=True,
    ):
        with attempt:
            return await unit()
    raise AssertionError("unreachable: tenacity either returns or raises")


async def fetch(
    pool: asyncpg.Pool,
    what: str,
    query: str,
    *args: Any,
    give_up_after: float | None = None,
    until: asyncio.Event | None = None,
) -> list[asyncpg.Record]:
    """One statement in its own transaction, retried as a unit."""

    async def unit() -> list[asyncpg.Record]:
        async with pool.acquire(timeout=30) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    return await retrying(what, unit, give_up_after=give_up_after, until=until)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early when ``stop`` is set; True when stopping. A cancellation always
    propagates: Python 3.11's asyncio.wait_for swallows one that comes as ``stop`` is set,
    and the service cancelled would run on, keeping its worker from ever exiting."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True


# SQLSTATEs of no usable connection: class 08 (connection exceptions), 57P (the server
# shutting down, starting up, or ending the session), too many connections, and the server
# refusing these credentials or this database: nothing a retry of the statement mends, and
# over once the server is back or an operator has acted.
_UNAVAILABLE_PREFIXES = ("08", "57P")
_UNAVAILABLE_STATES = frozenset({"53300", "28000", "28P01", "3D000"})
_DRIVERS = frozenset({"asyncpg", "psycopg", "sqlalchemy"})


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, what it wraps (SQLAlchemy's ``orig``, an exception group's members)
    and its causes, outermost first."""
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is seen for seen in chain):
            continue
        chain.append(current)
        todo.extend([getattr(current, "orig", None), current.__cause__])
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
    return chain


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc``, from whichever driver (asyncpg, psycopg, bare or wrapped by
    SQLAlchemy), means the database cannot be used right now: the connection refused,
    unreachable, timed out, lost or closed, the server shutting down or starting up, too
    many connections, these credentials or this database refused, no connection free in
    the pool. A bad statement, a constraint, a deadlock or a statement timeout is no outage.
    """
    return _unavailable_cause(exc) is not None


def _unavailable_cause(exc: BaseException) -> BaseException | None:
    """The innermost link of ``exc`` that says the database is unavailable, if any: the
    driver's own words rather than a wrapper's."""
    found = None
    for link in _causes(exc):
        if _means_unavailable(link):
            found = link
    return found


def _means_unavailable(link: BaseException) -> bool:
    # A SQLAlchemy error can only exist once SQLAlchemy is loaded; a worker never loads it.
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(link, sa_exc.SQLAlchemyError):
        if isinstance(link, sa_exc.DBAPIError) and link.connection_invalidated:
            return True  # the dialect saw the connection drop
        # No connection free in the pool within its timeout, or else a wrapper: what it
        # wraps says more.
        return isinstance(link, sa_exc.TimeoutError)
    state = getattr(link, "sqlstate", None)
    if isinstance(state, str):
        return state.startswith(_UNAVAILABLE_PREFIXES) or state in _UNAVAILABLE_STATES
    if isinstance(link, asyncpg.InterfaceError):
        return "closed" in str(link)  # "connection is closed", "pool is closing"
    if isinstance(link, asyncpg.exceptions.InternalClientError):
        # What asyncpg raises, about a third of the time, for the next statement on a
        # connection the server has just ended ("cannot switch to state ...").
        return True
    if hasattr(link, "sqlstate"):
        # A driver's error that no server sent: for psycopg, an OperationalError without a
        # SQLSTATE is a connection that could not be made or was lost.
        return any(cls.__name__ == "OperationalError" for cls in type(link).__mro__)
    # Refused, no such host, no answer in time: from the driver's code, not the app's own
    # (an OSError from a file or another service is no database outage).
    return isinstance(link, OSError) and _raised_by_a_driver(link)


def _raised_by_a_driver(exc: BaseException) -> bool:
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get("__name__", "").partition(".")[0] in _DRIVERS:
            return True
        frame = frame.tb_next
    return False


def where(dsn: str) -> str:
    """host:port/database of a URL, for messages (never the password)."""
    from sqlalchemy.engine import make_url  # only once there is something to say

    try:
        url = make_url(sqlalchemy_url(dsn))
    except Exception:
        return "DATABASE_URL"
    host = url.host or url.query.get("host") or "localhost"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = f":{url.port}" if url.port else ""
    return f"{host}{port}/{url.database or ''}"


def database_error(exc: BaseException, dsn: str) -> OutboxError | None:
    """A driver error as the library's error, when it is one an operator can act on: the
    database cannot be used (see is_database_unavailable), or it has no pgoutbox schema."""
    cause = _unavailable_cause(exc)
    if cause is not None:
        reason = one_line(cause) or (
            f"no answer within {CONNECT_TIMEOUT_SECONDS:g}s"
            if isinstance(cause, TimeoutError)
            else type(cause).__name__
        )
        return DatabaseUnavailable(f"cannot reach the database at {where(dsn)}: {reason}")
    for link in _causes(exc):
        if isinstance(link, asyncpg.exceptions.UndefinedTableError):
            return ConfigError(
                f"the database at {where(dsn)} has no pgoutbox schema ({one_line(link)}): "
                "run `outbox-worker migrate`"
            )
    return None
