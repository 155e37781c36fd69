"""The library's schema: its Alembic revisions, and what ``outbox-worker migrate`` does with them.

The revisions live in ``outbox_worker/migrations/versions``, a branch labelled ``pgoutbox``.
A database gets them one of two ways, and each records them in its own place:

* ``outbox-worker migrate`` (:func:`upgrade`) runs them in the library's own environment and
  records them in ``pgoutbox_alembic_version``; the application's ``alembic_version`` is
  never read for writing, so the application's Alembic cannot confuse the two histories.
* An application's own Alembic lists :data:`VERSIONS` in its ``version_locations``; its
  ``alembic upgrade heads`` then records the branch in its ``alembic_version``, beside its
  own revisions.

:class:`SchemaState` reads both records, for ``migrate --check`` and the worker's start-up
check; which one applies tells which command brings the schema to head.

Public for an application's Alembic: :data:`VERSIONS` and :func:`not_pgoutbox` (``__all__``);
the rest serves the CLI and the worker. Alembic and SQLAlchemy are imported where they are
used, so that the worker's start-up check (:func:`recorded_state`) loads neither.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import asyncpg

from outbox_worker.db import is_database_unavailable
from outbox_worker.errors import ConfigError, OutboxError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.environment import NameFilterParentNames, NameFilterType
    from alembic.runtime.migration import MigrationInfo
    from alembic.script import ScriptDirectory
    from sqlalchemy import Connection
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["VERSIONS", "not_pgoutbox"]

SCRIPTS = Path(__file__).with_name("migrations")
# What an application's Alembic adds to its version_locations to carry the library's branch.
VERSIONS = SCRIPTS / "versions"
VERSION_TABLE = "pgoutbox_alembic_version"
APP_VERSION_TABLE = "alembic_version"
BRANCH = "pgoutbox"
# A session-level advisory lock held for a whole run: a second deploy migrating at the same
# moment waits for the first, then finds the schema at head and does nothing.
LOCK_KEY = 0x70676F7574626F78  # "pgoutbox"

MIGRATE = "`outbox-worker migrate`"
APP_MIGRATE = "your application's `alembic upgrade heads`"

Status = Literal["head", "behind", "ahead", "absent", "unrecorded"]


class SchemaNotAtHead(OutboxError):
    """The database's pgoutbox schema is not at this code's head."""


class MigrationFailed(OutboxError):
    """A revision failed; the ones before it are applied."""


def alembic_config() -> Config:
    """The library's own Alembic configuration (no file): what ``outbox-worker migrate`` runs."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    return config


@functools.cache
def alembic_script_directory() -> ScriptDirectory:
    """The branch as Alembic reads it."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision of the library's branch, which this code needs."""
    known = revisions()
    if not known:  # the package lost its versions directory
        raise ConfigError(f"no pgoutbox migrations in {VERSIONS}")
    return max(known)


@functools.cache
def revisions() -> frozenset[str]:
    """Every revision of the library's branch, read from the file names without Alembic: each
    revision ``pgoutbox_NNNN`` lives in ``pgoutbox_NNNN_<what>.py``, one after the other
    (a test holds the names to Alembic's own reading of the files)."""
    return frozenset("_".join(path.stem.split("_")[:2]) for path in VERSIONS.glob("pgoutbox_*.py"))


def describe(revision: str) -> str:
    """The first paragraph of a revision's docstring, on one line."""
    script = alembic_script_directory().get_revision(revision)
    return " ".join(script.doc.split()) if script is not None else revision


def not_pgoutbox(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """``include_name`` for an application's Alembic: autogenerate then neither proposes to
    drop the library's tables (which the application's models do not declare) nor copies a
    change of them into the application's revisions (the library's branch brings it)."""
    from outbox_worker.schema import metadata

    return type_ != "table" or (name not in metadata.tables and name != VERSION_TABLE)


@dataclass(frozen=True)
class SchemaState:
    """What a database records of the library's schema.

    ``own`` holds the rows of ``pgoutbox_alembic_version`` (``outbox-worker migrate``'s
    record), ``app`` those of ``alembic_version`` (an application's Alembic, which records the
    library's branch among its own revisions when it carries it), ``tables`` whether
    ``outbox_jobs`` exists. When an application's revision ``depends_on`` the branch's
    newest revision, Alembic keeps one row for the two, under the application's revision:
    then neither record names the library's, and the state is ``unrecorded``.
    """

    own: tuple[str, ...]
    app: tuple[str, ...]
    tables: bool

    @property
    def route(self) -> Literal["own", "app"] | None:
        """Where the library's revision is recorded, if anywhere."""
        if self.own:
            return "own"
        if revisions().intersection(self.app):
            return "app"
        return None

    @property
    def revision(self) -> str | None:
        if self.own:
            return self.own[0]  # one branch, one row
        return next((rev for rev in self.app if rev in revisions()), None)

    @property
    def status(self) -> Status:
        revision = self.revision
        if revision is None:
            return "unrecorded" if self.tables else "absent"
        if revision not in revisions():
            return "ahead"  # migrated by a newer pgoutbox
        return "head" if revision == head() else "behind"

    def summary(self, where: str) -> str:
        """One line: where the schema stands and, unless at head, the command that mends it."""
        status, revision = self.status, self.revision
        if status == "absent":
            return f"the database at {where} has no pgoutbox schema: run {MIGRATE}"
        if status == "behind":
            recorded = f" (recorded in {APP_VERSION_TABLE})" if self.route == "app" else ""
            return (
                f"the pgoutbox schema at {where} is at {revision}{recorded}, "
                f"this code needs {head()}: run {APP_MIGRATE if self.route == 'app' else MIGRATE}"
            )
        if status == "ahead":
            return (
                f"the pgoutbox schema at {where} is at {revision}, which this version of "
                f"pgoutbox does not know (its newest is {head()}): upgrade pgoutbox"
            )
        if status == "unrecorded":
            return (
                f"the pgoutbox tables at {where} have their revision recorded neither in "
                f"{VERSION_TABLE} nor in {APP_VERSION_TABLE}, so {MIGRATE} cannot tell or "
                f"upgrade it (if your application's Alembic carries the {BRANCH} branch, "
                "`alembic upgrade heads` does)"
            )
        return f"the pgoutbox schema at {where} is at {revision} (head)"


def state_of(conn: Connection) -> SchemaState:
    """The database's record, read the way Alembic reads it (no write: a missing version
    table stays missing)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    own = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    app = MigrationContext.configure(conn, opts={"version_table": APP_VERSION_TABLE})
    return SchemaState(
        own=own.get_current_heads(),
        app=app.get_current_heads(),
        tables=inspect(conn).has_table("outbox_jobs"),
    )


async def _versions(conn: asyncpg.Connection, table: str) -> tuple[str, ...]:
    try:
        rows = await conn.fetch(f"SELECT version_num FROM {table}")
    except (asyncpg.UndefinedTableError, asyncpg.InsufficientPrivilegeError):
        # No such table, or not one this role may read: no record to judge by.
        return ()
    return tuple(row[0] for row in rows)


async def recorded_state(conn: asyncpg.Connection) -> SchemaState:
    """The database's record on an asyncpg connection (the worker's), once its tables are
    known to exist. It must not be inside a transaction: a missing table is an error there."""
    own = await _versions(conn, VERSION_TABLE)
    app = await _versions(conn, APP_VERSION_TABLE)
    return SchemaState(own=own, app=app, tables=True)


async def upgrade(engine: AsyncEngine, where: str) -> tuple[str, ...]:
    """Bring the library's schema to head, recorded in ``pgoutbox_alembic_version``; the
    revisions applied, in order (none when it was at head).

    Refuses a database whose library schema the application's Alembic records, or whose
    tables no record explains: running the library's revisions there would fail on the
    first ``CREATE TABLE`` or fork the history in two.
    """
    async with engine.connect() as conn:
        return await conn.run_sync(_upgrade_locked, where)


def _upgrade_locked(conn: Connection, where: str) -> tuple[str, ...]:
    from sqlalchemy import exc as sa_exc
    from sqlalchemy import text

    from alembic import command

    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
    conn.commit()  # the lock outlives it; Alembic's per-revision transactions start clean
    try:
        state = state_of(conn)
        conn.commit()
        if state.route == "app":
            raise ConfigError(
                f"the pgoutbox schema at {where} is recorded in {APP_VERSION_TABLE} (at "
                f"{state.revision}): your application's Alembic carries it, so run "
                "`alembic upgrade heads` there instead"
            )
        if state.status == "unrecorded":
            raise ConfigError(state.summary(where))
        if state.status == "ahead":
            raise SchemaNotAtHead(state.summary(where))
        pending = [
            s.revision
            for s in alembic_script_directory().iterate_revisions("heads", state.revision)
        ]
        pending.reverse()
        applied: list[str] = []

        def record(*, step: MigrationInfo, **_: object) -> None:
            applied.extend(step.up_revision_ids)

        config = alembic_config()
        config.attributes["connection"] = conn
        config.attributes["on_version_apply"] = [record]
        try:
            command.upgrade(config, "heads")
        except sa_exc.DBAPIError as exc:
            if is_database_unavailable(exc):
                raise
            # Its own transaction rolled back; those before it stay committed.
            failed = pending[len(applied)]
            raise MigrationFailed(
                f"{failed} failed at {where}: {_reason(exc)} (the revisions before it are "
                "applied; run `outbox-worker migrate` again once that is mended)"
            ) from exc
        return tuple(applied)
    finally:
        conn.rollback()  # whatever a failure left open, so that the unlock can run
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
        conn.commit()


def _reason(exc: sa_exc.DBAPIError) -> str:
    """The server's words: the driver's exception that SQLAlchemy's adapter wraps."""
    inner = exc.orig.__cause__ if exc.orig is not None and exc.orig.__cause__ else exc.orig
    return " ".join(str(inner).split())


async def check(engine: AsyncEngine) -> SchemaState:
    """The database's record, read without the lock (it writes nothing)."""
    async with engine.connect() as conn:
        return await conn.run_sync(state_of)


def offline_sql() -> None:
    """Print to stdout the SQL that brings an empty database to head, bookkeeping included
    (Alembic's offline mode): for a DBA to review and apply by hand."""
    from alembic import command

    command.upgrade(alembic_config(), "heads", sql=True)
