"""What runs in a handler process (processes.py): one call at a time over its pipe, until the
worker closes the pipe, kills it, or dies.

The worker sends a call as JSON: the handler's module and name, the job's args, the
context's fields and the run's trace context. The child imports the handler by name (once
per child), calls it with an OffloadedContext in that trace context, and answers with
tuples: ``("progress", json)`` as the handler reports, then one of ``("ok", result_json,
problem)``, ``("snooze", seconds)``, ``("cancel", reason)``, ``("retry", seconds,
reason)`` or ``("error", pickled_or_None, type_name, message, traceback)``.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import structlog

from outbox_worker import tracing
from outbox_worker._worker.storable import encode_result
from outbox_worker.config import WorkerSettings
from outbox_worker.context import OffloadedContext, current_correlation_id
from outbox_worker.control import CancelJob, RetryJob, SnoozeJob
from outbox_worker.logs import configure_logging
from outbox_worker.registry import BaseTask

Handlers = dict[tuple[str, str], Callable[..., Any]]


def serve(conn: Connection) -> None:
    """The child's main, started by multiprocessing ("spawn": a fresh interpreter)."""
    # A terminal's Ctrl-C and a process manager's SIGTERM reach the whole process group: the
    # worker drains this child's job as it drains the others, and kills the child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    _configure_logging()
    handlers: Handlers = {}
    try:
        conn.send(("ready",))
        while True:
            request = json.loads(conn.recv_bytes())
            conn.send(_run(conn, handlers, request))
    except (EOFError, OSError):
        return  # the worker closed its end: it is stopping, or gone


def _exit_with_parent() -> None:
    """Exit as soon as the worker is gone, however it went (SIGKILL included), even in the
    middle of a handler: nothing would read its answer."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="outbox-parent-watch", daemon=True).start()


def _configure_logging() -> None:
    """The worker's log format and level, as the environment gives them to the CLI."""
    try:
        settings = WorkerSettings()
    except Exception:  # an environment the worker's own start has judged; defaults here
        settings = WorkerSettings.model_construct()
    configure_logging(level=settings.log_level, fmt=settings.log_format)


def _handler(handlers: Handlers, module: str, name: str) -> Callable[..., Any]:
    found = handlers.get((module, name))
    if found is None:
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        found = target.spec.handler if isinstance(target, BaseTask) else target
        handlers[module, name] = found
    return found


def _run(conn: Connection, handlers: Handlers, request: dict[str, Any]) -> tuple[Any, ...]:
    fields: dict[str, Any] = request["ctx"]
    ctx = OffloadedContext(
        **fields,
        pool=None,
        log=structlog.get_logger("outbox_worker"),
        report_progress=lambda text: conn.send(("progress", text)),
    )
    current_correlation_id.set(fields["correlation_id"])
    with structlog.contextvars.bound_contextvars(
        job_id=ctx.job_id, task=ctx.task, attempt=ctx.attempt, correlation_id=ctx.correlation_id
    ):
        try:
            handler = _handler(handlers, request["module"], request["name"])
            with tracing.continuing(request["trace"]):
                value = handler(ctx, **request["args"])
        except SnoozeJob as exc:
            return ("snooze", exc.seconds)
        except CancelJob as exc:
            return ("cancel", exc.reason)
        except RetryJob as exc:
            return ("retry", exc.seconds, str(exc.reason))
        except BaseException as exc:
            # SystemExit and the like too: as in an async handler, they fail the attempt.
            return (
                "error",
                _pickled(exc),
                type(exc).__name__,
                _message(exc),
                "".join(traceback.format_exception(exc)),
            )
    result = encode_result(value)
    return ("ok", result.json, result.problem)


def _pickled(exc: BaseException) -> bytes | None:
    """The exception as the worker can rebuild it (for its task's retry policy), or None
    for one that does not survive pickling (a constructor that wants other arguments)."""
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)  # noqa: S301 -- our own bytes, just made
    except Exception:
        return None
    return payload


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<str() of the exception failed>"
