"""pgoutbox itself: the real ``outbox-worker`` CLI, and ``enqueue``/``enqueue_many`` with an
``AsyncSession``, as an application uses them; and the same two on every other kind of
session they take: a raw asyncpg connection and a raw psycopg 3 ``AsyncConnection``, each
inside ``conn.transaction()`` and with ``autocommit=True`` (each call committed on its own,
as a service without SQLAlchemy may use it), and ``outbox_worker.sync``'s on a sync
SQLAlchemy ``Session`` on psycopg."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import psycopg
import structlog
from alembic.config import Config
from psycopg.rows import TupleRow
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import bench.tasks  # noqa: F401  (registers the tasks enqueue checks names against)
import outbox_worker
from alembic import command
from bench.inprocess import Driver, OnJob, Producer
from bench.measure import ROOT, Child
from bench.pg import execute, fetchval
from bench.systems.base import Client, System, WorkerOpts, child_main
from outbox_worker import NewJob, asyncpg_dsn, enqueue, enqueue_many, sqlalchemy_url, sync


def migrate(url: str) -> None:
    config = Config(str(Path(ROOT) / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "heads")


async def fill_jobs(url: str, jobs: int) -> None:
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with AsyncSession(engine) as session, session.begin():
            for start in range(0, jobs, 10_000):
                await enqueue_many(session, [NewJob("noop")] * min(10_000, jobs - start))
    finally:
        await engine.dispose()


def _log_time(child: Child, event: str) -> float | None:
    for line in child.events():
        if line.get("event") == event and "timestamp" in line:
            return datetime.fromisoformat(str(line["timestamp"])).timestamp()
    return None


class Pgoutbox(System):
    name = "pgoutbox"
    module = "bench.systems.pgoutbox"
    other_singles = (
        "one_asyncpg",
        "one_asyncpg_tx",
        "one_psycopg_tx",
        "one_psycopg_autocommit",
        "one_sync_session",
    )
    other_batches = (
        "batch_asyncpg_tx",
        "batch_asyncpg_autocommit",
        "batch_psycopg_tx",
        "batch_psycopg_autocommit",
        "batch_sync_session",
    )

    async def prepare(self, url: str) -> None:
        # Alembic runs its own event loop: give it a thread of its own.
        await asyncio.to_thread(migrate, url)

    async def fill(self, url: str, jobs: int) -> None:
        await fill_jobs(url, jobs)
        await execute(url, "VACUUM ANALYZE outbox_jobs")

    async def finished(self, url: str) -> int:
        query = "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'"
        return int(str(await fetchval(url, query)))

    async def pending(self, url: str) -> int:
        query = "SELECT count(*) FROM outbox_jobs WHERE state IN ('queued', 'running')"
        return int(str(await fetchval(url, query)))

    def worker_args(self, url: str, settings: dict[str, int], *, burst: bool) -> list[str]:
        return [
            "-m",
            "outbox_worker",
            "run",
            "bench.tasks:registry",
            "--concurrency",
            str(settings.get("concurrency", 100)),
            *(["--burst"] if burst else []),
        ]

    def worker_env(self, url: str) -> dict[str, str]:
        return {"DATABASE_URL": url, "OUTBOX_LOG_FORMAT": "json"}

    def ready_time(self, child: Child) -> float | None:
        return _log_time(child, "worker_ready")

    def done_time(self, child: Child) -> float | None:
        return _log_time(child, "burst_done")


SYSTEM = Pgoutbox()


# ---------------------------------------------------------------------------------------------
# Child side (the worker is the real CLI; only the clients live here)
# ---------------------------------------------------------------------------------------------


def psycopg_url(dsn: str) -> str:
    """The URL in the form SQLAlchemy's sync engine takes on psycopg 3."""
    return "postgresql+psycopg://" + asyncpg_dsn(dsn).removeprefix("postgresql://")


class PgoutboxClient:
    def __init__(
        self,
        engine: AsyncEngine,
        conn: asyncpg.Connection,
        pconn: psycopg.AsyncConnection[TupleRow],
        sync_engine: Engine,
    ) -> None:
        self.engine = engine
        self.conn = conn
        # In autocommit mode, so that conn.transaction() is the only transaction, as on asyncpg.
        self.pconn = pconn
        self.sync_engine = sync_engine

    async def one(self, stamp: int | None) -> None:
        async with AsyncSession(self.engine) as session, session.begin():
            if stamp is None:
                await enqueue(session, "noop")
            else:
                await enqueue(session, "stamp", {"i": stamp})

    async def one_asyncpg(self, stamp: int | None) -> None:
        """One job committed on its own on a raw asyncpg connection (``autocommit=True``):
        one statement, as pgqueuer's enqueue is. The same job inside the app's transaction
        costs that transaction's BEGIN and COMMIT besides: ``make bench-bounds`` times both."""
        if stamp is None:
            await enqueue(self.conn, "noop", autocommit=True)
        else:
            await enqueue(self.conn, "stamp", {"i": stamp}, autocommit=True)

    async def one_asyncpg_tx(self, stamp: int | None) -> None:
        """One job in its own transaction on a raw asyncpg connection: BEGIN, INSERT, COMMIT."""
        async with self.conn.transaction():
            await enqueue(self.conn, "noop")

    async def one_psycopg_tx(self, stamp: int | None) -> None:
        async with self.pconn.transaction():
            await enqueue(self.pconn, "noop")

    async def one_psycopg_autocommit(self, stamp: int | None) -> None:
        await enqueue(self.pconn, "noop", autocommit=True)

    async def one_sync_session(self, stamp: int | None) -> None:
        """``outbox_worker.sync.enqueue`` in a sync ``Session``'s transaction (blocking: the
        event loop has nothing else to do in this process)."""
        with Session(self.sync_engine) as session, session.begin():
            sync.enqueue(session, "noop")

    async def batch(self, jobs: int) -> None:
        async with AsyncSession(self.engine) as session, session.begin():
            await enqueue_many(session, [NewJob("noop")] * jobs)

    async def batch_asyncpg_tx(self, jobs: int) -> None:
        async with self.conn.transaction():
            await enqueue_many(self.conn, [NewJob("noop")] * jobs)

    async def batch_asyncpg_autocommit(self, jobs: int) -> None:
        await enqueue_many(self.conn, [NewJob("noop")] * jobs, autocommit=True)

    async def batch_psycopg_tx(self, jobs: int) -> None:
        async with self.pconn.transaction():
            await enqueue_many(self.pconn, [NewJob("noop")] * jobs)

    async def batch_psycopg_autocommit(self, jobs: int) -> None:
        await enqueue_many(self.pconn, [NewJob("noop")] * jobs, autocommit=True)

    async def batch_sync_session(self, jobs: int) -> None:
        with Session(self.sync_engine) as session, session.begin():
            sync.enqueue_many(session, [NewJob("noop")] * jobs)

    async def close(self) -> None:
        await self.pconn.close()
        self.sync_engine.dispose()
        await self.conn.close()
        await self.engine.dispose()


async def connect(dsn: str) -> Client:
    return PgoutboxClient(
        create_async_engine(sqlalchemy_url(dsn)),
        await asyncpg.connect(dsn),
        await psycopg.AsyncConnection.connect(asyncpg_dsn(dsn), autocommit=True),
        create_engine(psycopg_url(dsn)),
    )


async def _no_worker(opts: WorkerOpts) -> None:
    raise SystemExit("pgoutbox's worker is `outbox-worker run bench.tasks:registry`")


# ---------------------------------------------------------------------------------------------
# In-process worker and producer (the steady and xmin sections, bench/inprocess.py)
# ---------------------------------------------------------------------------------------------

# What the CLI runs with when no OUTBOX_RETENTION_* is set: a pruner that never finds rows
# old enough within a bench run, but runs its statement as a deployed worker does.
CLI_RETENTION = {
    "succeeded": timedelta(days=7),
    "cancelled": timedelta(days=7),
    "dead": timedelta(days=30),
}


class PgoutboxProducer:
    """``enqueue``/``enqueue_many`` with ``autocommit=True`` on a raw asyncpg connection:
    one statement per call that commits on its own, as pgqueuer's ``Queries.enqueue``."""

    def __init__(self, outbox: outbox_worker.Outbox, conn: asyncpg.Connection) -> None:
        self.outbox = outbox
        self.conn = conn

    async def one(self, stamp: float) -> None:
        await self.outbox.enqueue(self.conn, "steady", {"t": stamp}, autocommit=True)

    async def many(self, stamp: float, jobs: int) -> None:
        job = outbox_worker.NewJob("steady", {"t": stamp})
        await self.outbox.enqueue_many(self.conn, [job] * jobs, autocommit=True)

    async def close(self) -> None:
        await self.conn.close()


class PgoutboxInProcess:
    """``outbox_worker.Worker`` on a ``Registry`` of one task, from the public API: the
    CLI's defaults but the concurrency, logging at INFO as the CLI does."""

    def __init__(self, dsn: str, concurrency: int) -> None:
        self.dsn = dsn
        self.options = outbox_worker.WorkerOptions(
            dsn=dsn, concurrency=concurrency, retention=dict(CLI_RETENTION)
        )
        self.settings = f"concurrency={concurrency}"
        self.registry = outbox_worker.Registry()
        self.outbox = outbox_worker.Outbox(self.registry)
        self.worker: outbox_worker.Worker | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, on_job: OnJob) -> None:
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        )

        async def steady(ctx: outbox_worker.JobContext, t: float) -> None:
            await on_job(t)

        self.registry.add(steady, name="steady")
        self.worker = outbox_worker.Worker(self.registry, self.options)
        self.task = asyncio.create_task(self.worker.run())
        ready = asyncio.create_task(self.worker.ready.wait())
        await asyncio.wait({self.task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self.task  # raises what the worker failed with
            raise RuntimeError("the worker stopped before it was ready")

    async def producer(self) -> Producer:
        return PgoutboxProducer(self.outbox, await asyncpg.connect(self.dsn))

    async def stop(self) -> None:
        if self.worker is not None and self.task is not None:
            self.worker.stop()
            await self.task


def in_process(dsn: str, concurrency: int, batch_size: int) -> Driver:
    return PgoutboxInProcess(dsn, concurrency)


if __name__ == "__main__":
    child_main(work=_no_worker, connect=connect)
