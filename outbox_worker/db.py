"""The worker's asyncpg pool and the one place that decides which database errors to retry.

PRINCIPLES rule 8: the unit retried is a whole transaction (here, a single autocommit
statement, or a callable that owns its transaction), never a statement inside one.
"""

from __future__ import annotations

import asyncio
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

T = TypeVar("T")

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
        # PgBouncer in transaction mode (PRINCIPLES rule 14).
        statement_cache_size=1024 if prepared_statements else 0,
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
            error=f"{type(exc).__name__}: {exc}",
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
    """Sleep, waking early when ``stop`` is set; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
