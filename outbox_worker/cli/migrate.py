"""``outbox-worker migrate``: the command only; what it runs is :mod:`outbox_worker.migrate`'s."""

from __future__ import annotations

from typing import Annotated

import typer

from outbox_worker import db, migrate
from outbox_worker.cli.database import with_engine
from outbox_worker.cli.output import visible
from outbox_worker.cli.params import DatabaseUrl, resolve_dsn


def migrate_schema(
    sql: Annotated[
        bool,
        typer.Option(
            "--sql",
            help="Print the SQL that brings an empty database to head (bookkeeping included) "
            "instead of running it; needs no database.",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Change nothing: exit 0 if the schema is at head, 1 with the command to run "
            "if not.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Bring pgoutbox's tables to this version's head, recorded in pgoutbox_alembic_version
    (never in your alembic_version). Running it again, or from two deploys at once, is safe."""
    if sql and check:
        raise typer.BadParameter("give --sql or --check, not both", param_hint="--sql")
    if sql:
        migrate.offline_sql()
        return
    dsn = resolve_dsn(database_url)
    where = db.where(dsn)
    if check:
        state = with_engine(dsn, migrate.check)
        if state.status != "head":
            raise migrate.SchemaNotAtHead(state.summary(where))
        print(visible(state.summary(where)))
        return
    applied = with_engine(dsn, lambda engine: migrate.upgrade(engine, where))
    # Plain lines, unwrapped: deploy logs keep each one whole.
    for revision in applied:
        print(f"applied {revision}: {migrate.describe(revision)}")
    done = "" if applied else ": nothing to do"
    print(visible(f"the pgoutbox schema at {where} is at {migrate.head()} (head){done}"))
