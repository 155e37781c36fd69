"""Run an enqueue's plan (outbox_worker.enqueue_plans) on the session or connection the caller has.

A plan is the same whatever runs it; what differs per driver is only how one statement is
sent and its rows read back: SQLAlchemy (any of its PostgreSQL drivers: ``text()``,
``:name``), asyncpg (``$n``, sql.positional) and psycopg 3 (``%(name)s``, sql.pyformat). One
small loop per side, async and sync, sends each statement's rows back into the plan.

Which runner fits is told by the session's type, looked up once per type. A session of the
other side, or a raw connection whose INSERT would commit on its own (outside any
transaction) unless the caller said ``autocommit=True``, is refused with WrongSession when
the enqueue is called, before any SQL and even when the call is never awaited; the message
names what to call instead. ``autocommit=True`` is the other way round: only a raw
connection outside a transaction can honour it, so every other session is refused.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox_worker import sql
from outbox_worker.enqueue_plans import Plan, Rows
from outbox_worker.errors import WrongSession

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")
C = TypeVar("C")


class AsyncRunner(Protocol):
    def __call__(self, session: Any, plan: Plan[T], /) -> Coroutine[Any, Any, T]: ...


class SyncRunner(Protocol):
    def __call__(self, session: Any, plan: Plan[T], /) -> T: ...


# A check of the session's state, made on every call (the type alone does not say whether a
# raw connection is in a transaction): ``function`` names the enqueue function called, and
# the flag is its ``autocommit``, whether the caller wants the job to commit on its own.
Check = Callable[[Any, str, bool], None]


def _drive(plan: Plan[T], fetch: Callable[[C, str, Mapping[str, Any]], Rows], conn: C) -> T:
    """Send ``plan`` the rows of each statement it yields until it returns its result; a
    statement's error is thrown into the plan, which raises it on (its span records it)."""
    try:
        query = next(plan)
        while True:
            try:
                rows = fetch(conn, *query)
            except BaseException as exc:
                plan.throw(exc)
                raise
            query = plan.send(rows)
    except StopIteration as done:
        result: T = done.value
        return result


async def _drive_async(
    plan: Plan[T], fetch: Callable[[C, str, Mapping[str, Any]], Awaitable[Rows]], conn: C
) -> T:
    try:
        query = next(plan)
        while True:
            try:
                rows = await fetch(conn, *query)
            except BaseException as exc:
                plan.throw(exc)
                raise
            query = plan.send(rows)
    except StopIteration as done:
        result: T = done.value
        return result


# ---------------------------------------------------------------------------------------------
# SQLAlchemy: a sync Session or Connection; an async one runs the same code in its greenlet
# ---------------------------------------------------------------------------------------------


@functools.cache
def _text(statement: str) -> TextClause:
    return text(statement)  # text() parses its bind parameters: once per statement


def _fetch_session(session: Session, statement: str, params: Mapping[str, Any]) -> Rows:
    # On the session's own connection: Session.execute would run the ORM's machinery for a
    # plain statement, and SQLModel's Session warns that its execute() is deprecated.
    return session.connection().execute(_text(statement), params).all()


def _fetch_connection(conn: Connection, statement: str, params: Mapping[str, Any]) -> Rows:
    return conn.execute(_text(statement), params).all()


def _run_session(session: Session, plan: Plan[T]) -> T:
    return _drive(plan, _fetch_session, session)


def _run_connection(conn: Connection, plan: Plan[T]) -> T:
    return _drive(plan, _fetch_connection, conn)


async def _run_async_session(session: AsyncSession, plan: Plan[T]) -> T:
    # The whole plan in one greenlet switch, as one session.execute() would take.
    return await session.run_sync(_run_session, plan)


async def _run_async_connection(conn: AsyncConnection, plan: Plan[T]) -> T:
    return await conn.run_sync(_run_connection, plan)


# ---------------------------------------------------------------------------------------------
# asyncpg
# ---------------------------------------------------------------------------------------------


@functools.cache
def _positional(statement: str) -> tuple[str, tuple[str, ...]]:
    names = sql.parameter_names(statement)
    return sql.positional(statement, *names), names


async def _fetch_asyncpg(conn: Any, statement: str, params: Mapping[str, Any]) -> Rows:
    query, names = _positional(statement)
    rows: Rows = await conn.fetch(query, *[params[name] for name in names])
    return rows


async def _run_asyncpg(conn: Any, plan: Plan[T]) -> T:
    return await _drive_async(plan, _fetch_asyncpg, conn)


def _check_asyncpg(conn: Any, function: str, autocommit: bool) -> None:
    in_transaction = conn.is_in_transaction()
    if autocommit and in_transaction:
        raise WrongSession(
            f"{function}(autocommit=True) asks the job to commit on its own, and this asyncpg "
            "connection is in a transaction, which the job would join: leave autocommit out, "
            "or call it outside the transaction"
        )
    if not autocommit and not in_transaction:
        raise WrongSession(
            "this asyncpg connection is not in a transaction, so the job would commit on its "
            f"own, apart from your writes: call {function}() inside "
            "`async with conn.transaction():`, or pass autocommit=True if it is meant to"
        )


# ---------------------------------------------------------------------------------------------
# psycopg 3, imported only by an app that uses it
# ---------------------------------------------------------------------------------------------


@functools.cache
def _pyformat(statement: str) -> str:
    return sql.pyformat(statement)


def _fetch_psycopg(
    conn: psycopg.Connection[Any], statement: str, params: Mapping[str, Any]
) -> Rows:
    from psycopg.rows import tuple_row

    # Rows as tuples whatever row factory the app gave the connection.
    with conn.cursor(row_factory=tuple_row) as cursor:
        cursor.execute(_pyformat(statement), params)
        return cursor.fetchall()


async def _fetch_psycopg_async(
    conn: psycopg.AsyncConnection[Any], statement: str, params: Mapping[str, Any]
) -> Rows:
    from psycopg.rows import tuple_row

    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(_pyformat(statement), params)
        return await cursor.fetchall()


def _run_psycopg(conn: psycopg.Connection[Any], plan: Plan[T]) -> T:
    return _drive(plan, _fetch_psycopg, conn)


async def _run_psycopg_async(conn: psycopg.AsyncConnection[Any], plan: Plan[T]) -> T:
    return await _drive_async(plan, _fetch_psycopg_async, conn)


def _autocommit_check(opener: str) -> Check:
    def check(
        conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
        function: str,
        autocommit: bool,
    ) -> None:
        idle = sys.modules["psycopg"].pq.TransactionStatus.IDLE
        commits_alone = conn.autocommit and conn.info.transaction_status == idle
        if autocommit and not commits_alone:
            raise WrongSession(
                f"{function}(autocommit=True) asks the job to commit on its own, and on this "
                "psycopg connection it would join a transaction (autocommit mode is off, or a "
                f"`conn.transaction()` block is open): leave autocommit out and commit, or "
                "call it on a connection in autocommit mode outside a transaction block"
            )
        if not autocommit and commits_alone:
            raise WrongSession(
                "this psycopg connection is in autocommit mode outside a transaction, so the "
                f"job would commit on its own, apart from your writes: call {function}() "
                f"inside `{opener} conn.transaction():`, turn autocommit off, or pass "
                "autocommit=True if it is meant to"
            )

    return check


_check_psycopg = _autocommit_check("with")
_check_psycopg_async = _autocommit_check("async with")


# ---------------------------------------------------------------------------------------------
# Which runner: by the session's type, once per type
# ---------------------------------------------------------------------------------------------

_ASYNC: dict[type, tuple[AsyncRunner, Check | None]] = {}
_SYNC: dict[type, tuple[SyncRunner, Check | None]] = {}


def async_runner(session: object, function: str, autocommit: bool = False) -> AsyncRunner:
    """How to run plans on ``session``, for the async ``function`` (``enqueue``…); raises
    WrongSession when it cannot."""
    found = _ASYNC.get(type(session))
    if found is None:
        found = _ASYNC[type(session)] = _async_kind(session, function)
    runner, check = found
    _check(session, function, autocommit, check)
    return runner


def sync_runner(session: object, function: str, autocommit: bool = False) -> SyncRunner:
    """How to run plans on ``session``, for ``outbox_worker.sync``'s ``function``; raises
    WrongSession when it cannot."""
    found = _SYNC.get(type(session))
    if found is None:
        found = _SYNC[type(session)] = _sync_kind(session, function)
    runner, check = found
    _check(session, function, autocommit, check)
    return runner


def _check(session: object, function: str, autocommit: bool, check: Check | None) -> None:
    if check is not None:
        check(session, function, autocommit)
    elif autocommit:
        raise WrongSession(
            f"{function}(autocommit=True) asks the job to commit on its own, and a SQLAlchemy "
            f"{_name(session)} always runs it in a transaction: leave autocommit out and "
            "commit the session"
        )


def _psycopg() -> Any:
    """The psycopg module if the app imported it: a session can be one of its connections
    only then, and pgoutbox does not import it for an app that does not use it."""
    return sys.modules.get("psycopg")


def _async_kind(session: object, function: str) -> tuple[AsyncRunner, Check | None]:
    psycopg = _psycopg()
    if isinstance(session, AsyncSession):
        return _run_async_session, None
    if isinstance(session, AsyncConnection):
        return _run_async_connection, None
    if isinstance(session, asyncpg.Connection):  # pool connections too
        return _run_asyncpg, _check_asyncpg
    if psycopg is not None and isinstance(session, psycopg.AsyncConnection):
        return _run_psycopg_async, _check_psycopg_async
    if isinstance(session, Session | Connection) or (
        psycopg is not None and isinstance(session, psycopg.Connection)
    ):
        raise WrongSession(
            f"{function}() takes an async session or connection, and this is a sync "
            f"{_name(session)}: call outbox_worker.sync.{function}() (or your Outbox's "
            f".sync.{function}()), which is not awaited"
        )
    raise WrongSession(f"{function}() cannot enqueue on {_name(session)}: {_WANTED}")


def _sync_kind(session: object, function: str) -> tuple[SyncRunner, Check | None]:
    psycopg = _psycopg()
    if isinstance(session, Session):
        return _run_session, None
    if isinstance(session, Connection):
        return _run_connection, None
    if psycopg is not None and isinstance(session, psycopg.Connection):
        return _run_psycopg, _check_psycopg
    if isinstance(session, AsyncSession | AsyncConnection | asyncpg.Connection) or (
        psycopg is not None and isinstance(session, psycopg.AsyncConnection)
    ):
        raise WrongSession(
            f"outbox_worker.sync.{function}() takes a sync session or connection, and this "
            f"is an async {_name(session)}: call `await outbox_worker.{function}(...)` (or "
            f"your Outbox's {function}())"
        )
    raise WrongSession(f"sync.{function}() cannot enqueue on {_name(session)}: {_WANTED}")


_WANTED = (
    "pass the session or connection whose transaction the job joins: SQLAlchemy's "
    "AsyncSession or AsyncConnection, an asyncpg connection or a psycopg AsyncConnection to "
    "outbox_worker.enqueue(); SQLAlchemy's Session or Connection (psycopg or psycopg2) or a "
    "psycopg Connection to outbox_worker.sync.enqueue()"
)


def _name(session: object) -> str:
    kind = type(session)
    if isinstance(session, (Engine, AsyncEngine, asyncpg.Pool)):
        return f"{kind.__module__}.{kind.__qualname__} (an engine or pool, not a transaction)"
    return f"{kind.__module__}.{kind.__qualname__}"


# ---------------------------------------------------------------------------------------------
# Without the check, for plans that need not join the caller's transaction: the test helpers'
# (outbox_worker.testing), which word their own refusals
# ---------------------------------------------------------------------------------------------

R = TypeVar("R")


def async_runner_unchecked(session: object) -> AsyncRunner | None:
    """How to run plans on ``session`` if it is an async session or connection, in a
    transaction or not; None if it is not. The check that keeps a job from committing on
    its own has nothing to guard for a read, nor for a test fixture's clear_jobs."""
    return _unchecked(_ASYNC, _async_kind, session)


def sync_runner_unchecked(session: object) -> SyncRunner | None:
    """:func:`async_runner_unchecked` for a sync session or connection."""
    return _unchecked(_SYNC, _sync_kind, session)


def _unchecked(
    known: dict[type, tuple[R, Check | None]],
    kind: Callable[[object, str], tuple[R, Check | None]],
    session: object,
) -> R | None:
    found = known.get(type(session))
    if found is None:
        try:
            found = known[type(session)] = kind(session, "")
        except WrongSession:  # the other side's session, or none: the caller says so
            return None
    return found[0]
