"""``outbox-worker prune``: delete finished jobs past an age, a batch per transaction so that
a large delete neither holds locks for long nor bloats one transaction."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import admin
from outbox_worker.cli.database import with_schema
from outbox_worker.cli.output import print_json, stdout
from outbox_worker.cli.params import AsJson, DatabaseUrl, duration, resolve_dsn


def finished_states(value: str) -> tuple[str, ...]:
    """``--state dead,cancelled``: finished states only, each once, in the order given."""
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise typer.BadParameter("give at least one state", param_hint="--state")
    for name in names:
        if name not in admin.FINISHED:
            raise typer.BadParameter(
                f"only finished jobs can be pruned ({', '.join(admin.FINISHED)}), not {name!r}",
                param_hint="--state",
            )
    return names


def prune(
    older_than: Annotated[
        str,
        typer.Option(help="Delete jobs that finished longer ago than this (e.g. 7d, 12h, 30m)."),
    ],
    state: Annotated[
        str, typer.Option(help="Comma-separated finished states to prune.")
    ] = "succeeded,dead,cancelled",
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Rows per transaction.")] = 1000,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Delete finished jobs older than a duration, a batch per transaction."""
    age = duration(older_than, "--older-than")
    states = finished_states(state)
    dsn = resolve_dsn(database_url)

    if as_json:

        async def quiet(engine: AsyncEngine) -> int:
            return await admin.prune_finished(
                engine, older_than=age, states=states, batch=batch, progress=None
            )

        deleted = with_schema(dsn, quiet)
        print_json(
            {
                "deleted": deleted,
                "older_than_seconds": age.total_seconds(),
                "states": list(states),
            }
        )
        return

    # The bar goes to stderr, so stdout keeps only the summary.
    progress = Progress(
        SpinnerColumn(),
        TextColumn("pruning {task.fields[states]}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} deleted"),
        TimeElapsedColumn(),
        console=Console(stderr=True, markup=False, highlight=False),
        transient=False,
    )

    async def with_bar(engine: AsyncEngine) -> int:
        # with_schema has connected before the bar is drawn: an unreachable database is
        # one error line.
        with progress:
            bar = progress.add_task("prune", total=None, states=",".join(states))

            def advance(deleted: int) -> None:
                progress.advance(bar, deleted)

            total = await admin.prune_finished(
                engine, older_than=age, states=states, batch=batch, progress=advance
            )
            progress.update(bar, total=max(total, 1), completed=max(total, 1))
            return total

    deleted = with_schema(dsn, with_bar)
    noun = "job" if deleted == 1 else "jobs"
    stdout().print(
        f"deleted {deleted} finished {noun} ({', '.join(states)}) older than {older_than}"
    )
