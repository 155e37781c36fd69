"""The flags and arguments several commands share, and the reading of what users type
(queue names, durations, the environment) into values, a mistake into a one-line error."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from outbox_worker.config import WorkerSettings, parse_duration
from outbox_worker.errors import ConfigError
from outbox_worker.jobs import MAX_JOB_ID
from outbox_worker.names import NAME_PATTERN, is_valid_name

DatabaseUrl = Annotated[str | None, typer.Option(help="Default: $DATABASE_URL")]
AsJson = Annotated[
    bool, typer.Option("--json", help="Print JSON to stdout (and nothing else) for scripts.")
]
JobId = Annotated[int, typer.Argument(metavar="JOB_ID", min=1, max=MAX_JOB_ID, help="Job id.")]


def queue_names(value: str | None) -> tuple[str, ...]:
    """``--queues a,b``; none given is every queue the registry names."""
    if value is None:
        return ()
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise typer.BadParameter("give at least one queue name", param_hint="--queues")
    for name in names:
        if not is_valid_name(name):
            raise typer.BadParameter(f"{name!r} must match {NAME_PATTERN}", param_hint="--queues")
    return names


def duration(value: str, flag: str, *, positive: bool = False) -> timedelta:
    """``--older-than 7d`` and friends; a bad value is a usage error naming the flag."""
    try:
        parsed = parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None
    if not isinstance(parsed, timedelta):
        raise typer.BadParameter("give a duration like 30s, 15m, 12h or 7d", param_hint=flag)
    if positive and parsed <= timedelta(0):
        raise typer.BadParameter(f"{value!r} must be longer than zero", param_hint=flag)
    return parsed


def settings(**overrides: Any) -> WorkerSettings:
    """The environment, with the flags given (not None) over it; the only place the CLI
    reads it. A bad value is a ConfigError naming the setting."""
    try:
        loaded = WorkerSettings()
        data = loaded.model_dump() | {k: v for k, v in overrides.items() if v is not None}
        return WorkerSettings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid {where}: {first['msg']}") from exc


def resolve_dsn(database_url: str | None) -> str:
    """``--database-url``, else ``$DATABASE_URL``, checked; the operator's commands need
    nothing else of the settings."""
    return settings(database_url=database_url).require_database_url()
