"""``outbox-worker health``: is this deployment able to run jobs? The database answers,
pgoutbox's schema (and the project's migrations) are at the heads this code expects, and a
worker's heartbeat is recent. Exit 0 when healthy, 1 when not, for probes and deploy gates;
a database that cannot be reached is a failing check in the report, not an error."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import admin, db, migrate
from outbox_worker.cli.database import with_engine
from outbox_worker.cli.output import print_json, stdout, visible
from outbox_worker.cli.params import AsJson, DatabaseUrl, duration, resolve_dsn
from outbox_worker.db import database_error
from outbox_worker.errors import ConfigError, DatabaseUnavailable
from outbox_worker.formatting import one_line


def expected_heads(ini: Path) -> list[str] | None:
    """The migration heads of the Alembic scripts that ``ini`` names; None without the file."""
    if not ini.is_file():
        return None
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    try:
        return sorted(ScriptDirectory.from_config(Config(str(ini))).get_heads())
    except Exception as exc:
        raise ConfigError(f"cannot read the migrations of {ini}: {one_line(exc)}") from exc


def _current_heads(sync_conn: Connection) -> list[str]:
    from alembic.runtime.migration import MigrationContext

    return sorted(MigrationContext.configure(sync_conn).get_current_heads())


# How health rates each state of the pgoutbox schema: "ahead" is a newer pgoutbox's schema,
# which this version's workers serve (rolling deploys); "unrecorded", tables whose revision
# no bookkeeping names, which they serve as they are.
_SCHEMA_HEALTH = {
    "head": "ok",
    "ahead": "ok",
    "unrecorded": "unknown",
    "behind": "failing",
    "absent": "failing",
}


async def _health(
    engine: AsyncEngine,
    dsn: str,
    *,
    within: float,
    heads: list[str] | None,
    ini: Path,
    host: str | None,
) -> dict[str, Any]:
    where = db.where(dsn)
    database: dict[str, Any] = {"status": "ok", "at": where}
    schema: dict[str, Any] = {"status": "unknown", "current": None, "expected": migrate.head()}
    migrations: dict[str, Any] = {"status": "unknown", "current": None, "expected": heads}
    workers: dict[str, Any] = {"status": "unknown", "alive": 0, "within_seconds": within}
    if host is not None:
        workers["host"] = host
    try:
        async with engine.connect() as conn:
            state = await conn.run_sync(migrate.state_of)
            schema["current"] = state.revision
            schema["recorded_in"] = {"own": migrate.VERSION_TABLE, "app": "alembic_version"}.get(
                state.route or ""
            )
            schema["status"] = _SCHEMA_HEALTH[state.status]
            if state.status != "head":
                schema["detail"] = state.summary(where)
            current = await conn.run_sync(_current_heads)
            migrations["current"] = current
            if heads is None:
                migrations["detail"] = f"no {ini} to compare with"
            elif current == heads:
                migrations["status"] = "ok"
            else:
                migrations["status"] = "failing"
                migrations["detail"] = f"database at {current or 'no revision'}, scripts at {heads}"
            try:
                alive = await admin.workers_alive(conn, within_seconds=within)
            except Exception as exc:
                if not isinstance(database_error(exc, dsn), ConfigError):
                    raise
                workers["detail"] = "no outbox_workers table: run `outbox-worker migrate`"
                workers["status"] = "failing"
            else:
                if host is not None:
                    # A worker's id starts with its host's name (Worker's new_worker_id).
                    alive = [w for w in alive if w.id.startswith(f"{host}:")]
                workers["alive"] = len(alive)
                workers["workers"] = [
                    {"id": w.id, "queues": w.queues, "last_seen_at": w.last_seen_at} for w in alive
                ]
                workers["status"] = "ok" if alive else "failing"
                if not alive:
                    on = "" if host is None else f" on host {host}"
                    workers["detail"] = f"no worker heartbeat{on} within {within:g}s"
    except Exception as exc:
        error = database_error(exc, dsn)
        if not isinstance(error, DatabaseUnavailable):
            raise
        database = {"status": "failing", "at": db.where(dsn), "detail": str(error)}
    healthy = (
        database["status"] == "ok"
        and schema["status"] != "failing"
        and migrations["status"] != "failing"
        and workers["status"] == "ok"
    )
    return {
        "status": "healthy" if healthy else "unhealthy",
        "checks": {
            "database": database,
            "schema": schema,
            "migrations": migrations,
            "workers": workers,
        },
    }


def health(
    within: Annotated[
        str, typer.Option(help="A worker counts as alive if its heartbeat is this recent.")
    ] = "60s",
    alembic_ini: Annotated[
        Path,
        typer.Option(
            help="The project's alembic.ini, to compare the database with its migration heads "
            "too (migrations is 'unknown' when the file is not there)."
        ),
    ] = Path("alembic.ini"),
    this_host: Annotated[
        bool,
        typer.Option(
            "--this-host",
            help="Count only the workers of this host (its name begins their ids): in a "
            "pod's liveness probe, the pod's own worker.",
        ),
    ] = False,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Database reachable, pgoutbox's schema at this version's head (and the project's
    migrations at theirs), a worker heartbeat seen recently. Exits 0 when healthy, 1 when
    not."""
    within_seconds = duration(within, "--within", positive=True).total_seconds()
    heads = expected_heads(alembic_ini)
    dsn = resolve_dsn(database_url)

    async def work(engine: AsyncEngine) -> dict[str, Any]:
        return await _health(
            engine,
            dsn,
            within=within_seconds,
            heads=heads,
            ini=alembic_ini,
            host=socket.gethostname() if this_host else None,
        )

    report = with_engine(dsn, work)
    if as_json:
        print_json(report)
    else:
        _print_health(report)
    if report["status"] != "healthy":
        raise typer.Exit(1)


def _print_health(report: dict[str, Any]) -> None:
    console = stdout()
    checks = report["checks"]
    styles = {"ok": "green", "failing": "bold red", "unknown": "yellow"}
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    database = checks["database"]
    table.add_row(
        "database",
        Text(database["status"], style=styles[database["status"]]),
        visible(database.get("detail", database["at"])),
    )
    schema = checks["schema"]
    schema_detail = schema.get("detail") or f"at {schema['current']}"
    table.add_row(
        "schema", Text(schema["status"], style=styles[schema["status"]]), visible(schema_detail)
    )
    migrations = checks["migrations"]
    if migrations["status"] == "ok":
        migrations_detail = f"at {', '.join(migrations['current'])}"
    else:
        migrations_detail = migrations.get("detail", "not checked")
        if migrations["current"] is not None and migrations["status"] == "unknown":
            current = ", ".join(migrations["current"]) or "no revision"
            migrations_detail += f" (database at {current})"
    table.add_row(
        "migrations",
        Text(migrations["status"], style=styles[migrations["status"]]),
        visible(migrations_detail),
    )
    workers = checks["workers"]
    if workers["status"] == "ok":
        ids = ", ".join(worker["id"] for worker in workers["workers"])
        on = f" on host {workers['host']}" if "host" in workers else ""
        workers_detail = (
            f"{workers['alive']} alive{on} within {workers['within_seconds']:g}s: {ids}"
        )
    else:
        workers_detail = workers.get("detail", "not checked")
    table.add_row(
        "workers",
        Text(workers["status"], style=styles[workers["status"]]),
        visible(workers_detail),
    )
    console.print(table)
    status = report["status"]
    console.print(Text(status, style="bold green" if status == "healthy" else "bold red"))
