"""The Alembic environment ``outbox-worker migrate`` runs the library's revisions in.

They are recorded in a version table of their own, so that they never meet the revisions
of the application's Alembic in ``alembic_version``. Online, :mod:`outbox_worker.migrate`
hands over its connection (which holds the advisory lock that serialises concurrent runs);
offline (``--sql``) needs no database at all.
"""

from __future__ import annotations

from alembic import context
from outbox_worker.migrate import VERSION_TABLE
from outbox_worker.schema import metadata

config = context.config

if context.is_offline_mode():
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
    )
elif "connection" not in config.attributes:
    raise SystemExit(
        "pgoutbox's migrations run through `outbox-worker migrate`, or as a branch of your "
        "own Alembic (its version_locations); not with this directory as script_location"
    )
else:
    context.configure(
        connection=config.attributes["connection"],
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # Each revision commits on its own, so that one may use autocommit_block() (CREATE
        # INDEX CONCURRENTLY) and a failure keeps the revisions before it.
        transaction_per_migration=True,
        on_version_apply=config.attributes.get("on_version_apply", ()),
    )

with context.begin_transaction():
    context.run_migrations()
