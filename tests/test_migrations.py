"""The library's migrations and its SQLAlchemy model agree, and round-trip; an application's
own Alembic carries them as a branch (the sample's does, and so does a new one built as
docs/schema.md says); a database of the chain before that split upgrades with its rows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import BigInteger, Column, Connection, ForeignKey, MetaData, Table
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from alembic import command
from app.main import schema_heads
from outbox_worker import migrate
from outbox_worker.config import sqlalchemy_url
from outbox_worker.schema import metadata, outbox_jobs
from tests.catalog import catalog
from tests.conftest import ROOT, alembic_config


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
    await asyncio.to_thread(command.upgrade, config, "heads")
    assert await shape() == before


async def test_pgoutbox_0004_moves_unreadable_run_at_to_the_edges(
    database_url: str, pool: asyncpg.Pool
) -> None:
    config = alembic_config(database_url)
    await asyncio.to_thread(command.downgrade, config, "pgoutbox_0003")
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

    await asyncio.to_thread(command.upgrade, config, "heads")

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


# ---------------------------------------------------------------------------------------------
# an application's own Alembic carrying the pgoutbox branch
# ---------------------------------------------------------------------------------------------

# What docs/schema.md tells an application to write: the library's versions by package name
# in version_locations, and not_pgoutbox in env.py.
SHOP_INI = """\
[alembic]
script_location = %(here)s/migrations
version_locations =
    %(here)s/migrations/versions
    outbox_worker:migrations/versions
path_separator = newline
"""

SHOP_ENV = """\
import asyncio

from sqlalchemy import BigInteger, Column, ForeignKey, MetaData, Table, pool
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import context
from outbox_worker.config import sqlalchemy_url
from outbox_worker.migrate import not_pgoutbox
from outbox_worker.schema import outbox_jobs

metadata = MetaData()
Table(
    "invoices",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("job_id", BigInteger, ForeignKey(outbox_jobs.c.id)),
)


def run(connection):
    context.configure(
        connection=connection, target_metadata=metadata, include_name=not_pgoutbox
    )
    with context.begin_transaction():
        context.run_migrations()


async def main():
    url = sqlalchemy_url(context.config.attributes["database_url"])
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(run)
        await connection.commit()
    await engine.dispose()


asyncio.run(main())
"""

SHOP_REVISION = '''\
"""invoices, each pointing at the job that mails it."""

import sqlalchemy as sa
from alembic import op

revision = "shop_0001"
down_revision = None
branch_labels = ("shop",)
depends_on = "pgoutbox_0001"  # outbox_jobs, which the foreign key names


def upgrade():
    op.create_table(
        "invoices",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("job_id", sa.BigInteger, sa.ForeignKey("outbox_jobs.id")),
    )


def downgrade():
    op.drop_table("invoices")
'''

SHOP_METADATA = MetaData()
Table(
    "invoices",
    SHOP_METADATA,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("job_id", BigInteger, ForeignKey(outbox_jobs.c.id)),
)


def shop_config(root: Path, url: str) -> Config:
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "alembic.ini").write_text(SHOP_INI)
    (root / "migrations" / "env.py").write_text(SHOP_ENV)
    (root / "migrations" / "versions" / "shop_0001_invoices.py").write_text(SHOP_REVISION)
    config = Config(str(root / "alembic.ini"))
    config.attributes["database_url"] = url
    return config


def _proposed(connection: Connection, include_name: Any) -> list[Any]:
    opts = {} if include_name is None else {"include_name": include_name}
    return list(compare_metadata(MigrationContext.configure(connection, opts=opts), SHOP_METADATA))


async def test_an_applications_alembic_carries_the_pgoutbox_branch(
    tmp_path: Path, empty_databases: Callable[[], Awaitable[str]]
) -> None:
    url = await empty_databases()
    config = shop_config(tmp_path, url)
    assert set(ScriptDirectory.from_config(config).get_heads()) == {"pgoutbox_0018", "shop_0001"}

    await asyncio.to_thread(command.upgrade, config, "heads")

    conn = await asyncpg.connect(url)
    try:
        versions = {row[0] for row in await conn.fetch("SELECT version_num FROM alembic_version")}
        referenced = await conn.fetchval(
            "SELECT confrelid::regclass::text FROM pg_constraint "
            "WHERE conrelid = 'invoices'::regclass AND contype = 'f'"
        )
        own_table = await conn.fetchval("SELECT to_regclass('pgoutbox_alembic_version')")
    finally:
        await conn.close()
    # Both histories in the application's one table; the library's own table never made.
    assert versions == {"pgoutbox_0018", "shop_0001"}
    assert referenced == "outbox_jobs"
    assert own_table is None

    engine = create_async_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        state = await migrate.check(engine)
        # Autogenerate proposes nothing with not_pgoutbox; without it, dropping the queue.
        await asyncio.to_thread(command.check, config)
        async with engine.connect() as sa_conn:
            unfiltered = await sa_conn.run_sync(_proposed, None)
            filtered = await sa_conn.run_sync(_proposed, migrate.not_pgoutbox)
    finally:
        await engine.dispose()
    assert (state.route, state.status) == ("app", "head")
    assert filtered == []
    dropped = {diff[1].name for diff in unfiltered if diff[0] == "remove_table"}
    assert dropped == set(metadata.tables)


async def test_the_samples_autogenerate_proposes_nothing(
    empty_databases: Callable[[], Awaitable[str]],
) -> None:
    url = await empty_databases()
    config = alembic_config(url)
    await asyncio.to_thread(command.upgrade, config, "heads")
    await asyncio.to_thread(command.check, config)  # raises on any proposed operation


# ---------------------------------------------------------------------------------------------
# a database of the chain before the library shipped its own migrations
# ---------------------------------------------------------------------------------------------

OLD_CHAIN = ROOT / "tests" / "data" / "old_chain"

# Users, comments, reports, a sent email, a worker, and a job in every state.
OLD_ROWS = """
INSERT INTO users (email, name) VALUES ('ann@example.com', 'Ann'), ('ben@example.com', NULL);
INSERT INTO comments (author, body) VALUES ('ann', 'first!');
INSERT INTO outbox_jobs (task, queue, args, priority, dedupe_key, correlation_id, run_at)
     VALUES ('send_email', 'mail', '{"user_id": 1}', 5, 'welcome:1', 'req-1',
             '2030-01-01 00:00:00+00');
INSERT INTO outbox_jobs (task, state, attempts, locked_by, locked_until, started_at)
     VALUES ('build_report', 'running', 1, 'host:7:abc', now() + interval '1 minute', now());
INSERT INTO outbox_jobs (task, state, attempts, result, started_at, finished_at)
     VALUES ('build_report', 'succeeded', 1, '{"rows": 3}', now(), now());
INSERT INTO outbox_jobs (task, state, attempts, max_attempts, last_error, finished_at)
     VALUES ('send_email', 'dead', 3, 3, 'SMTPError: refused', now());
INSERT INTO outbox_jobs (task, state, cancel_requested_at, finished_at)
     VALUES ('send_email', 'cancelled', now(), now());
INSERT INTO reports (id, status, params, result, idempotency_key, job_id, finished_at)
     VALUES ('00000000-0000-0000-0000-000000000001', 'done', '{"kind": "daily"}',
             '{"rows": 3}', 'idem-1', 3, now()),
            ('00000000-0000-0000-0000-000000000002', 'queued', '{}', NULL, NULL, 2, NULL);
INSERT INTO sent_emails (job_id, user_id, to_address, subject, body)
     VALUES (1, 1, 'ann@example.com', 'Welcome', 'Hello Ann');
INSERT INTO outbox_workers (id, queues, concurrency, in_flight)
     VALUES ('host:7:abc', '{default,mail}', 4, 1);
"""

OLD_TABLES = ("outbox_jobs", "outbox_workers", "users", "comments", "reports", "sent_emails")


def old_chain_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(OLD_CHAIN))
    config.attributes["database_url"] = url
    return config


async def _rows(conn: asyncpg.Connection, tables: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    return {
        table: [dict(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")]
        for table in tables
    }


def _as_before(
    after: dict[str, list[dict[str, Any]]], before: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """The rows after the upgrade, in the columns they had before it (later revisions add
    columns, with defaults)."""
    return {
        table: [{column: row.get(column) for column in (before[table] or [{}])[0]} for row in rows]
        for table, rows in after.items()
    }


@pytest.mark.parametrize("old_head", ["0005", "0006"])
async def test_a_database_of_the_old_chain_upgrades_with_every_row_kept(
    old_head: str, empty_databases: Callable[[], Awaitable[str]]
) -> None:
    url, fresh = await empty_databases(), await empty_databases()
    await asyncio.to_thread(command.upgrade, old_chain_config(url), old_head)
    tables = OLD_TABLES + (("outbox_revoked_sessions",) if old_head == "0006" else ())
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(OLD_ROWS)
        if old_head == "0006":
            await conn.execute(
                "INSERT INTO outbox_revoked_sessions VALUES ('s1', now() + interval '1 hour')"
            )
        before = await _rows(conn, tables)
    finally:
        await conn.close()
    assert len(before["outbox_jobs"]) == 5
    engine = create_async_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        # Nothing the library knows records it: `outbox-worker migrate` keeps off.
        assert (await migrate.check(engine)).status == "unrecorded"

        await asyncio.to_thread(command.upgrade, alembic_config(url), "heads")

        state = await migrate.check(engine)
    finally:
        await engine.dispose()
    await asyncio.to_thread(command.upgrade, alembic_config(fresh), "heads")

    conn = await asyncpg.connect(url)
    try:
        after = await _rows(conn, tables)
        versions = {row[0] for row in await conn.fetch("SELECT version_num FROM alembic_version")}
        next_id = await conn.fetchval("INSERT INTO outbox_jobs (task) VALUES ('x') RETURNING id")
    finally:
        await conn.close()
    assert _as_before(after, before) == before
    assert versions == set(schema_heads()) == {"pgoutbox_0018", "sample_0001"}
    assert (state.route, state.status) == ("app", "head")
    assert await catalog(url) == await catalog(fresh)
    assert next_id == 6  # the identity goes on where it was
