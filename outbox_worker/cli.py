"""``outbox-worker``: the worker and (later) the operator's commands.

The environment becomes settings here and only here; everything below gets plain values.
Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from typer.exceptions import TyperException

from outbox_worker.config import WorkerSettings
from outbox_worker.errors import ConfigError, OutboxError
from outbox_worker.logs import configure_logging
from outbox_worker.names import NAME_PATTERN, is_valid_name
from outbox_worker.registry import Registry
from outbox_worker.worker import Worker, WorkerOptions

app = typer.Typer(
    name="outbox-worker",
    help="Run pgoutbox workers and look after their queue.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)


def load_registry(target: str) -> Registry:
    """Import ``package.module:attribute`` and check that it is a Registry."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"expected MODULE:ATTRIBUTE (e.g. app.tasks:registry), got {target!r}")
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as exc:  # relative or malformed names too
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    registry = getattr(module, attribute, None)
    if registry is None:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}")
    if not isinstance(registry, Registry):
        raise ConfigError(f"{target} is a {type(registry).__name__}, not an outbox_worker.Registry")
    return registry


def _queues(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise typer.BadParameter("give at least one queue name", param_hint="--queues")
    for name in names:
        if not is_valid_name(name):
            raise typer.BadParameter(f"{name!r} must match {NAME_PATTERN}", param_hint="--queues")
    return names


def _settings(**overrides: Any) -> WorkerSettings:
    try:
        settings = WorkerSettings()
        data = settings.model_dump() | {k: v for k, v in overrides.items() if v is not None}
        return WorkerSettings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid {where}: {first['msg']}") from exc


def _run_async(main: Callable[[], Coroutine[Any, Any, None]], use_uvloop: bool) -> None:
    loop_factory = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


@app.callback()
def _group() -> None:
    """Run pgoutbox workers and look after their queue."""


@app.command()
def run(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:REGISTRY", help="Where the Registry lives, e.g. app.tasks:registry"
        ),
    ],
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="Jobs run at once.")
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated queues (default: every queue "
            "the registry's tasks name, plus default)."
        ),
    ] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit 0 once no due job is left.")] = False,
    lease_seconds: Annotated[float | None, typer.Option(min=0.1)] = None,
    poll_interval_seconds: Annotated[float | None, typer.Option(min=0.01)] = None,
    drain_timeout_seconds: Annotated[float | None, typer.Option(min=0)] = None,
    listen: Annotated[bool | None, typer.Option("--listen/--no-listen")] = None,
    listen_database_url: Annotated[str | None, typer.Option()] = None,
    database_url: Annotated[str | None, typer.Option(help="Default: $DATABASE_URL")] = None,
) -> None:
    """Claim and run jobs until SIGTERM/SIGINT (drains in-flight jobs, then exits 0)."""
    queue_names = _queues(queues)
    settings = _settings(
        database_url=database_url,
        concurrency=concurrency,
        lease_seconds=lease_seconds,
        poll_interval_seconds=poll_interval_seconds,
        drain_timeout_seconds=drain_timeout_seconds,
        listen=listen,
        listen_database_url=listen_database_url,
    )
    dsn = settings.require_database_url()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    registry = load_registry(target)
    options = WorkerOptions(
        dsn=dsn,
        queues=queue_names,
        concurrency=settings.concurrency,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval_seconds,
        drain_timeout=settings.drain_timeout_seconds,
        listen=settings.listen,
        listen_dsn=settings.listen_database_url,
        burst=burst,
        pool_size=settings.pool_size,
        prepared_statements=settings.prepared_statements,
        retry_base=settings.retry_base_seconds,
        retry_cap=settings.retry_cap_seconds,
        retention={
            "succeeded": settings.retention_succeeded,
            "cancelled": settings.retention_cancelled,
            "dead": settings.retention_dead,
        },
    )

    async def main() -> None:
        worker = Worker(registry, options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    _run_async(main, settings.uvloop)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors, exit 2 for usage, 1 for the rest."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="outbox-worker", standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except TyperException as exc:  # usage errors: bad flags, missing arguments
        print(f"outbox-worker: error: {exc.format_message()}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except OutboxError as exc:
        print(f"outbox-worker: error: {exc}", file=sys.stderr)
        raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
