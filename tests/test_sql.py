"""Every statement of ``outbox_worker.sql`` prepares against the migrated schema (so that a
typo fails the suite, not production), and the NOTIFY trigger fires once per inserting
statement, without data."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import sql

# Upper-case string constants of sql.py that are fragments or names, not statements.
NOT_STATEMENTS = frozenset({"JOB_SELECT_LIST", "NOTIFY_CHANNEL"})

ASYNCPG_PARAM = re.compile(r"\$(\d+)")
# ``:name`` but not the ``::type`` of a cast (nor the second colon of one).
SQLALCHEMY_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def discover_statements() -> dict[str, str]:
    """Every public upper-case string constant of sql.py that is a statement: a new constant
    is covered without touching this file."""
    return {
        name: value
        for name, value in vars(sql).items()
        if name.isupper()
        and not name.startswith("_")
        and isinstance(value, str)
        and name not in NOT_STATEMENTS
    }


STATEMENTS = discover_statements()


def test_discovery_finds_the_statements() -> None:
    assert STATEMENTS
    assert {"JOB_CLAIM", "JOB_INSERT", "JOB_INSERT_MANY", "JOB_COMPLETE_MANY"} <= set(STATEMENTS)
    assert NOT_STATEMENTS.isdisjoint(STATEMENTS)
    # The fragments are skipped on purpose: they exist, they just are not statements.
    assert all(isinstance(getattr(sql, name), str) for name in NOT_STATEMENTS)


@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_statement_prepares(name: str, pool: asyncpg.Pool, engine: AsyncEngine) -> None:
    statement = STATEMENTS[name]
    positional = {int(n) for n in ASYNCPG_PARAM.findall(statement)}
    named = set(SQLALCHEMY_PARAM.findall(statement))
    assert not (positional and named), f"{name} mixes $n and :name parameters"

    if named:
        # App side: what SQLAlchemy's asyncpg dialect sends is what must prepare.
        compiled = text(statement).compile(dialect=engine.dialect)
        to_prepare = str(compiled)
        assert ASYNCPG_PARAM.search(to_prepare), f"{name} did not compile to $n placeholders"
        assert not SQLALCHEMY_PARAM.search(to_prepare), to_prepare
        expected_params = len(compiled.positiontup or [])
        assert set(compiled.positiontup or []) == named
    else:
        to_prepare = statement
        expected_params = max(positional, default=0)
        assert positional == set(range(1, expected_params + 1)), f"{name} skips a $n"

    async with pool.acquire() as conn:
        try:
            prepared = await conn.prepare(to_prepare)
        except asyncpg.PostgresError as exc:
            pytest.fail(f"{name} does not prepare: {type(exc).__name__}: {exc}\n{to_prepare}")
        assert len(prepared.get_parameters()) == expected_params


async def test_one_empty_notification_per_inserting_statement(
    database_url: str, pool: asyncpg.Pool
) -> None:
    received: list[tuple[str, str]] = []

    def on_notify(_conn: object, _pid: int, channel: str, payload: str) -> None:
        received.append((channel, payload))

    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(sql.NOTIFY_CHANNEL, on_notify)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO outbox_jobs (task, args) "
                "SELECT 'echo', jsonb_build_object('n', g) FROM generate_series(1, 1000) g"
            )
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # stragglers, if the trigger were per row
    finally:
        await listener.close()

    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1000
    assert received == [(sql.NOTIFY_CHANNEL, "")]
    # PostgreSQL folds identical notifications of one transaction, so a data-free per-row
    # trigger would also arrive once; it would still run 1,000 times: check its level too.
    row_level = await pool.fetchval(
        "SELECT bool_or(tgtype & 1 = 1) FROM pg_trigger "
        "WHERE tgrelid = 'outbox_jobs'::regclass AND NOT tgisinternal"
    )
    assert row_level is False


async def test_no_notification_for_a_rolled_back_insert(
    database_url: str, pool: asyncpg.Pool
) -> None:
    received: list[str] = []

    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        received.append(payload)

    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(sql.NOTIFY_CHANNEL, on_notify)
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO outbox_jobs (task) VALUES ('echo')")
            await tx.rollback()
            # A committed insert afterwards proves the listener was listening.
            await conn.execute("INSERT INTO outbox_jobs (task) VALUES ('echo')")
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    finally:
        await listener.close()

    assert received == [""]
