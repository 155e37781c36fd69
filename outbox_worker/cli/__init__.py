"""``outbox-worker``: the worker and the operator's commands.

The environment becomes settings in this package only (:func:`params.settings`); everything
below gets plain values.
Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.

The operator's commands (``jobs``, ``queues``, ``schedules``, ``prune``, ``health``) go through
:mod:`outbox_worker.admin`, the one implementation the HTTP routes use too, each in a
transaction of its own on an engine made from ``DATABASE_URL``. ``--json`` prints what the
HTTP routes answer, to stdout, and nothing else. ``migrate`` is
:mod:`outbox_worker.migrate`'s.

Each command lives in a module of its own; this one only assembles them into the command
tree (in one place, so its order and names can be read at a glance) and is the entry point.
``outbox-worker run`` gets a tree of that command alone: a worker process then never loads
what the operator's commands need (SQLAlchemy, Alembic, rich tables), about 25 MB of memory
and a third of a second of start-up in every worker.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer
from typer.exceptions import TyperException

from outbox_worker.cli.output import visible
from outbox_worker.cli.run import run
from outbox_worker.errors import ConfigError, OutboxError
from outbox_worker.formatting import one_line

__all__ = ["app", "main"]


def _group(name: str, summary: str) -> typer.Typer:
    """A command group as every group here is made: plain text, errors left to main()."""
    return typer.Typer(
        name=name,
        help=summary,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        no_args_is_help=True,
    )


def _root() -> None:
    """Run pgoutbox workers and look after their queue."""


def build(*, operator_commands: bool = True) -> typer.Typer:
    """The command tree: every command, or ``run`` alone."""
    app = _group("outbox-worker", "Run pgoutbox workers and look after their queue.")
    app.callback()(_root)
    if not operator_commands:
        app.command()(run)
        return app
    from outbox_worker.cli.health import health
    from outbox_worker.cli.jobs import (
        jobs_cancel,
        jobs_list,
        jobs_retry,
        jobs_retry_dead,
        jobs_show,
    )
    from outbox_worker.cli.migrate import migrate_schema
    from outbox_worker.cli.prune import prune
    from outbox_worker.cli.queues import queues, queues_pause, queues_resume, queues_set
    from outbox_worker.cli.schedules import schedules

    jobs_app = _group("jobs", "List, show, retry and cancel jobs.")
    app.add_typer(jobs_app, name="jobs")
    app.command()(run)
    # Run alone, the group prints the stats: `outbox-worker queues [--json]` as ever.
    queues_app = _group(
        "queues",
        "Per queue: jobs by state, due now, oldest due, finished lately, its limit and pause."
        " set, pause and resume change those settings.",
    )
    app.add_typer(queues_app, name="queues", invoke_without_command=True, no_args_is_help=False)
    app.command()(schedules)
    app.command()(prune)
    app.command()(health)
    app.command("migrate")(migrate_schema)
    jobs_app.command("list")(jobs_list)
    jobs_app.command("show")(jobs_show)
    jobs_app.command("retry")(jobs_retry)
    jobs_app.command("cancel")(jobs_cancel)
    jobs_app.command("retry-dead")(jobs_retry_dead)
    queues_app.callback()(queues)
    queues_app.command("set")(queues_set)
    queues_app.command("pause")(queues_pause)
    queues_app.command("resume")(queues_resume)
    return app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the whole tree, built when asked for (docs and tests read it)
        return build()
    raise AttributeError(f"module 'outbox_worker.cli' has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: one-line errors, exit 2 for usage, 1 for the rest."""
    args = list(argv) if argv is not None else sys.argv[1:]
    command = typer.main.get_command(build(operator_commands=args[:1] != ["run"]))
    try:
        code = command.main(
            args=args,
            prog_name="outbox-worker",
            standalone_mode=False,
        )
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        raise SystemExit(130) from None
    except TyperException as exc:  # usage errors: bad flags, missing arguments
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, unprefixed
            print(exc.format_message(), file=sys.stderr)
        else:
            message = visible(one_line(exc.format_message()))
            print(f"outbox-worker: error: {message}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except OutboxError as exc:
        print(f"outbox-worker: error: {visible(one_line(exc))}", file=sys.stderr)
        raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
