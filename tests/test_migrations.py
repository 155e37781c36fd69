"""The migration and the SQLAlchemy model agree, and the migration round-trips."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command
from outbox_worker.schema import metadata
from tests.conftest import alembic_config


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            # The suite's own bookkeeping tables are not part of the schema under test.
            "include_name": lambda name, kind, _parent: kind != "table" or name in metadata.tables,
        },
    )
    return list(compare_metadata(context, metadata))


async def test_migration_matches_models(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        diff = await conn.run_sync(_diff)
    assert diff == []


async def test_downgrade_then_upgrade_round_trips(database_url: str, pool: asyncpg.Pool) -> None:
    async def shape() -> list[tuple[str, ...]]:
        rows = await pool.fetch(
            """
            SELECT 'column', column_name, data_type, coalesce(column_default, ''), is_nullable
              FROM information_schema.columns WHERE table_name = 'outbox_jobs'
            UNION ALL
            SELECT 'index', indexname, indexdef, '', '' FROM pg_indexes
             WHERE tablename = 'outbox_jobs'
            UNION ALL
            SELECT 'constraint', conname, pg_get_constraintdef(oid), '', '' FROM pg_constraint
             WHERE conrelid = 'outbox_jobs'::regclass
            UNION ALL
            SELECT 'trigger', tgname, pg_get_triggerdef(oid), '', '' FROM pg_trigger
             WHERE tgrelid = 'outbox_jobs'::regclass AND NOT tgisinternal
            UNION ALL
            SELECT 'option', unnest(reloptions), '', '', '' FROM pg_class
             WHERE relname = 'outbox_jobs'
            ORDER BY 1, 2
            """
        )
        return [tuple(r) for r in rows]

    before = await shape()
    assert any(kind == "trigger" for kind, *_ in before)
    config = alembic_config(database_url)
    await asyncio.to_thread(command.downgrade, config, "base")
    assert await pool.fetchval("SELECT to_regclass('outbox_jobs')") is None
    assert (
        await pool.fetchval("SELECT count(*) FROM pg_proc WHERE proname = 'outbox_jobs_notify'")
        == 0
    )
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await shape() == before


async def test_0005_moves_unreadable_run_at_to_the_edges(
    database_url: str, pool: asyncpg.Pool
) -> None:
    config = alembic_config(database_url)
    await asyncio.to_thread(command.downgrade, config, "0004")
    values = [
        "0100-06-01 12:00:00 BC",
        "-infinity",
        "2030-01-01 00:00:00+00",
        "12000-01-01 00:00:00+00",
        "infinity",
    ]
    for value in values:
        await pool.execute(
            "INSERT INTO outbox_jobs (task, run_at) VALUES ('echo', $1::text::timestamptz)", value
        )

    await asyncio.to_thread(command.upgrade, config, "head")

    rows = await pool.fetch("SELECT run_at FROM outbox_jobs ORDER BY id")
    assert [row["run_at"] for row in rows] == [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2030, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]
    validated = await pool.fetchval(
        "SELECT convalidated FROM pg_constraint WHERE conname = 'outbox_jobs_run_at_readable'"
    )
    assert validated is True
