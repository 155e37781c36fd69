"""``outbox-worker run``: the worker in the foreground until SIGTERM or SIGINT.

Everything a user can get wrong (the registry's name, a flag, the environment, a metrics
port in use) fails before the worker starts, in one line. Stopping is bounded: handlers that
ignore their cancellation, or threads still busy, do not keep the process alive past the
worker's drain timeout.

``--processes N`` (N > 1) runs N such workers as child processes of a supervisor
(:mod:`outbox_worker.cli.supervisor`); each child is this command again, told its
supervisor's pid by a hidden flag so that it stops if the supervisor is killed outright.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any

import structlog
import typer

from outbox_worker.cli.params import DatabaseUrl, queue_names, settings
from outbox_worker.errors import ConfigError
from outbox_worker.formatting import one_line
from outbox_worker.logs import configure_logging
from outbox_worker.registry import Registry
from outbox_worker.worker import Worker

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# How long the threads of asyncio.to_thread get to finish once the worker has stopped.
THREADS_GRACE_SECONDS = 1.0
# More worker processes than this under one supervisor is a typo, not a deployment: each
# opens pools of its own (docs/deployment.md), and hosts that need more run several pods.
MAX_PROCESSES = 256
# How often a supervised worker checks that its supervisor is still there.
SUPERVISOR_CHECK_SECONDS = 1.0


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


def start_metrics_server(
    port: int, host: str, registry: CollectorRegistry | None = None
) -> Callable[[], None]:
    """Serve ``registry`` (default: prometheus-client's default registry) over HTTP; returns
    the function that stops it."""
    from prometheus_client import REGISTRY, start_http_server

    try:
        server, thread = start_http_server(port, addr=host, registry=registry or REGISTRY)
    except OSError as exc:
        reason = exc.strerror or one_line(exc) or type(exc).__name__
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {reason}") from exc

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


async def abandon_stuck_handlers(worker: Worker, threads: ThreadPoolExecutor) -> None:
    """Exit at once if handlers are still running: tasks that ignored their cancellation, or
    threads still busy (asyncio.to_thread past a timeout, a thread a handler started).

    Every outcome that could be written is written; the leases of the rest lapse and a
    rescuer takes their jobs back. The interpreter would otherwise wait for those threads at
    exit (and asyncio for those tasks), and a SIGTERM'd worker must not outlive its drain
    timeout by minutes. Idle threads of the pool are no reason: they are let go first, and
    a clean stop then exits normally, exit hooks and all.
    """
    threads.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + THREADS_GRACE_SECONDS
    while True:
        busy = [
            thread
            for thread in threading.enumerate()
            if thread is not threading.current_thread() and not thread.daemon and thread.is_alive()
        ]
        if not busy or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    if busy or worker.stuck:
        worker.log.warning(
            "handlers_abandoned",
            threads=[t.name for t in busy],
            tasks=len(worker.stuck),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


async def stop_when_orphaned(worker: Worker, supervisor_pid: int) -> None:
    """Stop, draining as on SIGTERM, once the supervisor that started this process is gone.
    Killed outright (SIGKILL, the OOM killer), it could not stop its children, and a child
    left behind would run on unrestarted, its metrics served by no one."""
    while True:
        await asyncio.sleep(SUPERVISOR_CHECK_SECONDS)
        if os.getppid() != supervisor_pid:
            break
    worker.log.warning("supervisor_gone", supervisor_pid=supervisor_pid)
    worker.stop()


def run_async(main: Callable[[], Coroutine[Any, Any, None]], use_uvloop: bool) -> None:
    """``main`` on uvloop when asked for and installed, else on asyncio's own loop."""
    loop_factory = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def run(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:REGISTRY", help="Where the Registry lives, e.g. app.tasks:registry"
        ),
    ],
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="Jobs run at once.")
    ] = None,
    prefetch: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=10_000,
            help="Jobs claimed ahead of a free slot, so that a slot starts its next job at "
            "once (default: the concurrency, at least 256; 0: claim only for free slots).",
        ),
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
    startup_timeout_seconds: Annotated[
        float | None,
        typer.Option(min=0, help="How long to wait at start for a database that does not answer."),
    ] = None,
    listen: Annotated[bool | None, typer.Option("--listen/--no-listen")] = None,
    listen_database_url: Annotated[str | None, typer.Option()] = None,
    database_url: DatabaseUrl = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            envvar="OUTBOX_METRICS_PORT",
            help="Serve Prometheus metrics on this port (off by default).",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            envvar="OUTBOX_METRICS_HOST",
            help="Address the metrics server binds (0.0.0.0 for every interface).",
        ),
    ] = "127.0.0.1",
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_PROCESSES,
            help="Worker processes, each running --concurrency jobs, under one supervisor that "
            "restarts a crashed one and serves their metrics as one set (default 1: the worker "
            "runs in this process).",
        ),
    ] = 1,
    supervisor_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Claim and run jobs until SIGTERM/SIGINT (drains in-flight jobs, then exits 0)."""
    queue_list = queue_names(queues)
    worker_settings = settings(
        database_url=database_url,
        concurrency=concurrency,
        prefetch=prefetch,
        lease_seconds=lease_seconds,
        poll_interval_seconds=poll_interval_seconds,
        drain_timeout_seconds=drain_timeout_seconds,
        startup_timeout_seconds=startup_timeout_seconds,
        listen=listen,
        listen_database_url=listen_database_url,
    )
    options = worker_settings.worker_options(queues=queue_list, burst=burst)
    configure_logging(level=worker_settings.log_level, fmt=worker_settings.log_format)
    registry = load_registry(target)
    if processes > 1:
        # Imported here: a worker process never needs it.
        from outbox_worker.cli.supervisor import supervise

        supervise(
            ctx,
            processes=processes,
            drain_timeout=worker_settings.drain_timeout_seconds,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )
        return
    stop_metrics: Callable[[], None] | None = None
    if metrics_port is not None:
        # Before the worker starts, so a scrape sees the worker from its first claim on.
        stop_metrics = start_metrics_server(metrics_port, metrics_host)
        structlog.get_logger("outbox_worker").info(
            "metrics_serving", host=metrics_host, port=metrics_port, path="/metrics"
        )

    async def main() -> None:
        worker = Worker(registry, options)
        loop = asyncio.get_running_loop()
        # asyncio.to_thread's pool, held here so that the stop can let its idle threads go.
        threads = ThreadPoolExecutor(thread_name_prefix="outbox-handler")
        loop.set_default_executor(threads)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        watch = None
        if supervisor_pid is not None:
            watch = asyncio.create_task(stop_when_orphaned(worker, supervisor_pid))
        try:
            await worker.run()
        finally:
            if watch is not None:
                watch.cancel()
        await abandon_stuck_handlers(worker, threads)

    try:
        run_async(main, worker_settings.uvloop)
    finally:
        if stop_metrics is not None:
            stop_metrics()
