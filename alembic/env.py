"""The sample service's async Alembic environment: DATABASE_URL from the environment.

It carries two branches (alembic.ini's version_locations): the sample's own tables, and the
library's, labelled ``pgoutbox``; ``alembic upgrade heads`` brings both to head. Autogenerate
compares the sample's models only: the library's branch owns its tables.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic.runtime.migration import MigrationContext
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import context
from app.models import Base
from outbox_worker import sqlalchemy_url
from outbox_worker.migrate import not_pgoutbox

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

# The revisions of the single chain this directory held before the library shipped its own
# migrations (0001, 0003-0006 made the library's tables, 0002 the sample's), and what each
# stands for now. A database such a revision records is relabelled before anything else
# runs: its tables are already what the new revisions would make.
OLD_CHAIN = {
    "0001": ("pgoutbox_0001",),
    "0002": ("pgoutbox_0001", "sample_0001"),
    "0003": ("pgoutbox_0002", "sample_0001"),
    "0004": ("pgoutbox_0003", "sample_0001"),
    "0005": ("pgoutbox_0004", "sample_0001"),
    "0006": ("pgoutbox_0005", "sample_0001"),
}


def _database_url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL is not set")
    return sqlalchemy_url(url)


def _relabel_old_chain(connection: Connection) -> None:
    """Record a database of the old chain in the revisions that now stand for it.

    Alembic cannot do it alone: it refuses a version table naming a revision it does not
    know. The old row goes first (a purge, as ``alembic stamp --purge`` does), then Alembic
    stamps the new ones, in one transaction: it happens wholly or not at all.
    """
    migration = MigrationContext.configure(connection)
    current = migration.get_current_heads()
    if len(current) == 1 and current[0] in OLD_CHAIN:
        connection.execute(text("DELETE FROM alembic_version"))
        for revision in OLD_CHAIN[current[0]]:
            migration.stamp(context.script, revision)
    # Ends the read too, so that Alembic's per-revision transactions start on a clean slate.
    connection.commit()


def _run(connection: Connection) -> None:
    _relabel_old_chain(connection)
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=not_pgoutbox,
        compare_type=True,
        compare_server_default=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
